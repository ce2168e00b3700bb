"""train.engine: ray: the training child's own training, run by Ray Train's TorchTrainer.

Started by `synthtune.stages.train` as `python -m synthtune.stages._train_ray SPEC.json`, in its own
process group (it dies with the stage). It connects to `train.ray_address`, or starts a local Ray
cluster for the run and stops it after, and runs `train.num_workers` workers, each calling the
training child's `main` (synthtune.stages._train_child) as one rank of a torch process group that Ray
sets up (gloo on CPUs, NCCL on GPUs). Checkpoints are Ray's: rank 0 reports each one the trainer
saves, Ray persists it under the artifact root (RunConfig.storage_path, the run's work folder) and,
after a lost worker (FailureConfig.max_failures), restarts the group from the newest; a stage retry
finds them there too. The finished `final/` is reported last, so a driver on another node gets it and a
retry after a finished but uncommitted run trains nothing again. On an object-store root the workers
read nothing of the driver's disk: the rows (and a continued night's starting adapter) are staged
beside the checkpoints, and each worker trains in a work folder of its own node. Exit codes are the child's:
OOM_EXIT, BUDGET_EXIT, 1 when Ray gave up.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

from synthtune import budget
from synthtune.raycluster import ray_session
from synthtune.stages.train import BUDGET_EXIT, OOM_EXIT, OOM_MARK
from synthtune.store import ArtifactStore

STAGE = "train"
RUN = "ray"  # the Ray Train run's name: its checkpoints are in {work}/ray


def _report_callback():
    """Each checkpoint the trainer saves, reported to Ray Train: rank 0 with its files, the other ranks
    without (Ray asks every worker to report)."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import ray.train

            metrics = {"step": state.global_step, **{k: v for h in state.log_history for k, v in h.items()
                                                      if isinstance(v, (int, float))}}
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
            else:
                ray.train.report(metrics)

    return Report()


def _finished(folder: Path | None) -> bool:
    """The checkpoint Ray restored is a finished run's `final/` (its metrics and adapter), not a trainer's."""
    return folder is not None and (folder / "metrics.json").is_file()


def _stage_inputs(store: ArtifactStore, spec: dict) -> str:
    """On an object-store root, the files the workers read (the night's rows, the adapter a continued night
    starts from) uploaded beside Ray's checkpoints, so a worker on any node reads them; returns where."""
    inputs = f"{spec['ray_storage']}/inputs"
    store.fs.put(spec["data"], f"{inputs}/data.parquet")
    if spec.get("parent_adapter"):
        store.fs.put(spec["parent_adapter"], f"{inputs}/parent_adapter", recursive=True)
    return inputs


def _local_spec(config: dict, folder: Path) -> str:
    """This worker's spec file, in `folder`. On an object-store root its inputs come from the staged copies,
    into `folder` (the driver's paths are on the driver's node), and its work folder is this node's."""
    spec = dict(config["spec"])
    if config.get("inputs"):
        fs = ArtifactStore(config["artifact_root"]).fs
        fs.get(f"{config['inputs']}/data.parquet", str(folder / "data.parquet"))
        spec["data"] = str(folder / "data.parquet")
        if spec.get("parent_adapter"):
            fs.get(f"{config['inputs']}/parent_adapter/", str(folder / "parent_adapter"), recursive=True)
            spec["parent_adapter"] = str(folder / "parent_adapter")
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    return str(folder / "spec.json")


def worker(config: dict) -> None:
    """One rank: the child's training, resumed from Ray's newest checkpoint; rank 0 reports `final/`."""
    import ray.train

    from synthtune.stages._train_child import main

    work = Path(config["spec"]["work"])
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    with (tempfile.TemporaryDirectory(prefix="synthtune-ray-worker-") as own,
          checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored):
        folder = Path(restored) if restored else None
        if _finished(folder):
            return  # trained already: the driver takes final/ from this checkpoint
        rc = main(_local_spec(config, Path(own)), resume_from=folder, newest=False, callbacks=(_report_callback(),))
    if rc == OOM_EXIT:
        (work / OOM_MARK).write_text(json.dumps({"rank": rank}))
    elif rc not in (0, BUDGET_EXIT):  # over the GPU budget: stopped at a checkpoint, on purpose
        raise RuntimeError(f"training exited with code {rc} on rank {rank}")
    final = work / "final"
    if rank == 0 and rc == 0 and (final / "metrics.json").is_file():
        ray.train.report({"finished": 1}, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
    else:
        ray.train.report({"finished": 1})


def main(spec_path: str) -> int:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from synthtune.configs import PipelineConfig

    spec = json.loads(Path(spec_path).read_text())
    cfg = PipelineConfig.model_validate(spec["cfg"])
    tc, work = cfg.train, Path(spec["work"])
    store = ArtifactStore(cfg.artifact_root)
    storage: dict = {"storage_path": spec["ray_storage"]}
    loop = {"spec": spec, "artifact_root": cfg.artifact_root, "inputs": None}
    if not store.local:  # the root's own filesystem (its endpoint and credentials), through pyarrow
        import pyarrow.fs

        storage["storage_filesystem"] = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
        loop["inputs"] = _stage_inputs(store, spec)
    gpus = tc.ray_gpus_per_worker
    with ray_session(tc.ray_address, "train", num_cpus=tc.num_workers * tc.ray_cpus_per_worker, log_to_driver=True):
        trainer = TorchTrainer(
            worker, train_loop_config=loop,
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": tc.ray_cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
            run_config=RunConfig(name=RUN, failure_config=FailureConfig(max_failures=tc.ray_max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=tc.save_total_limit + 1), **storage))
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError: the recoveries are spent, or the error is the code's
            print(f"synthtune: Ray Train stopped ({type(e).__name__}): {e}", file=sys.stderr)
            return 1
    if (work / OOM_MARK).is_file():
        return OOM_EXIT
    if (work / budget.STOPPED).is_file():
        return BUDGET_EXIT
    if not (work / "final" / "metrics.json").is_file() and result.checkpoint is not None:
        result.checkpoint.to_directory(str(work / "final"))  # rank 0 ran on another node
    return 0 if (work / "final" / "metrics.json").is_file() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
