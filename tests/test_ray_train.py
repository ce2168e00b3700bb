"""train.engine=ray: the training child's own training run by Ray Train's TorchTrainer on a local Ray
cluster started for the run (2 CPU workers, gloo), checkpoints persisted by Ray under the artifact root,
a lost worker recovered by Ray from the newest of them; nothing of Ray left afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from synthtune import progress
from synthtune.stages import evaluate, promote, train
from synthtune.stages.train import work_dir
from synthtune.store import ArtifactStore
from tests.support import ray_processes

pytestmark = pytest.mark.integration


def _on_ray(cfg, **update):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"engine": "ray", "num_workers": 2, **update})})


def _losses(ref) -> list[float]:
    return [h["loss"] for h in json.loads(Path(f"{ref.uri}/loss_history.json").read_text()) if "loss" in h]


def test_ray_workers_train_the_demo_to_an_adapter_that_passes_the_gate(demo_run):
    """Two Ray workers at the demo's global batch (4 rows each per step): the 1-process demo's loss curve,
    an adapter the demo's gate promotes over base, and no Ray process once the stage is done."""
    cfg, refs = demo_run
    store = ArtifactStore(cfg.artifact_root)
    events: list[dict] = []
    with progress.listen(lambda e: events.append(e) if e["kind"] == "train" else None):
        ref = train.run(_on_ray(cfg), store, {"template": refs["template"]}, output_key="ray-demo")
    assert events and events[-1]["step"] == events[-1]["total"] == ref.summary["steps"]  # rank 0's bar, as locally
    ranks = ref.summary["ranks"]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == refs["train"].summary["steps"] > 0  # both stepped, every step
    a, b = _losses(refs["train"]), _losses(ref)
    assert len(a) == len(b) >= 10
    assert max(abs(x - y) / x for x, y in zip(a[:3], b[:3], strict=True)) < 1e-5  # what one process trains ...
    # ... to the float rounding of the gradient all-reduce, compounded over 240 steps at the demo's high rate
    assert max(abs(x - y) / x for x, y in zip(a, b, strict=True)) < 1e-2
    assert not ray_processes(), "the local Ray cluster outlived the stage"
    assert not work_dir(store, "ray-demo").exists()  # Ray's checkpoints dropped with the work folder

    tuned = evaluate.run(cfg, store, {"train": ref}, output_key="ray-demo-tuned")
    promoted, lines = promote.decide(cfg.promote, refs["evaluate[base]"].summary["scores"], tuned.summary["scores"])
    assert promoted, lines
    assert tuned.summary["scores"]["demo_facts"]["acc"] > refs["evaluate[base]"].summary["scores"]["demo_facts"]["acc"]


def _workers() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_a_ray_worker_killed_mid_run_is_recovered_from_the_checkpoint_on_the_artifact_root(demo_run):
    cfg, refs = demo_run
    store = ArtifactStore(cfg.artifact_root)
    run = _on_ray(cfg, max_steps=200, save_steps=10, logging_steps=10, seed=13)
    work = work_dir(store, "ray-killed")
    seen: dict = {}

    def kill_a_worker_after_a_checkpoint() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            # a checkpoint persisted by Ray under the artifact root, and registered (Ray polls every 2 s)
            if (registered := _registered(work)) and (workers := _workers()):
                seen.update(checkpoint=registered, worker=workers[-1])
                os.kill(workers[-1], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint)
    killer.start()
    ref = train.run(run, store, {"template": refs["template"]}, output_key="ray-killed")
    killer.join()
    assert seen.get("checkpoint"), "no checkpoint reached the artifact root before the run ended"
    resumed = ref.summary["resumed_from_step"]
    assert resumed >= 10 and ref.summary["first_step_this_run"] == resumed + 1  # not from step 0
    assert ref.summary["steps"] == 200
    assert not ray_processes(), "the local Ray cluster outlived the stage"


def _registered(work: Path) -> str | None:
    """The newest checkpoint Ray has registered for the run in `work` (persisted under the artifact root)."""
    with contextlib.suppress(OSError, ValueError):
        latest = json.loads((work / "ray" / "checkpoint_manager_snapshot.json").read_text()).get("latest_checkpoint_result")
        if latest and (work / "ray" / latest["checkpoint_dir_name"]).is_dir():
            return latest["checkpoint_dir_name"]
    return None


def test_killing_the_stage_leaves_no_ray_process_and_the_retry_resumes(demo_run):
    """A cancelled flow run, a Ctrl-C or a killed worker ends the stage's process: the Ray driver, the
    local cluster it started and the training workers go with it. The retry, a new Ray run, restores the
    newest checkpoint Ray registered under the artifact root."""
    cfg, refs = demo_run
    run = _on_ray(cfg, max_steps=400, save_steps=20, seed=17)
    store = ArtifactStore(cfg.artifact_root)
    work = work_dir(store, train.key(run, {"template": refs["template"].digest}))
    script = ("from synthtune.config import PipelineConfig; from synthtune.store import ArtifactStore, ArtifactRef\n"
              f"from synthtune.stages import train\ncfg = PipelineConfig.model_validate_json({run.model_dump_json()!r})\n"
              "train.run(cfg, ArtifactStore(cfg.artifact_root), "
              f"{{'template': ArtifactRef.model_validate_json({refs['template'].model_dump_json()!r})}})\n")
    stage = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (_registered(work) and len(_workers()) == 2) and time.time() < deadline:
        time.sleep(0.2)
    assert _registered(work) and len(_workers()) == 2, "no checkpoint registered while the workers ran"
    stage.send_signal(signal.SIGKILL)  # only the stage's own process
    stage.wait()
    deadline = time.time() + 30
    while ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    left = ray_processes()
    subprocess.run(["pkill", "-9", "-f", "ray::|raylet|gcs_server"], check=False)  # tidy on failure
    assert not left, f"Ray outlived the stage: {left}"

    ref = train.run(run, store, {"template": refs["template"]})  # the retry
    assert ref.summary["resumed_from_step"] >= 20 and ref.summary["steps"] == 400
    assert ref.summary["first_step_this_run"] == ref.summary["resumed_from_step"] + 1
    assert not ray_processes() and not work.exists()


def test_on_an_object_store_root_ray_keeps_checkpoints_and_inputs_there(demo_run, s3_root):
    """An S3 artifact root (a moto server): Ray persists the checkpoints there through the root's own
    filesystem, the workers read the night's rows from a copy staged there (never the driver's disk), and
    all of it goes once the adapter is committed."""
    cfg, refs = demo_run
    local = ArtifactStore(cfg.artifact_root)
    store = ArtifactStore(s3_root)
    for stage in ("generate", "filter", "template"):  # the demo's data chain, on the S3 root
        store.fs.put(local.path(stage, refs[stage].key), store.path(stage, refs[stage].key), recursive=True)
    run = _on_ray(cfg, max_steps=120, save_steps=10, logging_steps=10, seed=19).model_copy(
        update={"artifact_root": s3_root})
    k = train.key(run, {"template": refs["template"].digest})
    remote = store.path("train", ".work", k)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                seen.update(p.rsplit("/", 1)[-1] for p in store.fs.ls(f"{remote}/ray", detail=False, refresh=True))
                seen.update(p.rsplit("/", 1)[-1] for p in store.fs.ls(f"{remote}/inputs", detail=False, refresh=True))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ref = train.run(run, store, {"template": store.ref("template", refs["template"].key)})
    finally:
        done.set()
        watcher.join()
    assert ref.uri.startswith("s3://") and ref.summary["steps"] == 120
    assert any(name.startswith("checkpoint_") for name in seen), seen  # Ray's checkpoints, on S3
    assert "data.parquet" in seen  # the rows the workers read
    assert not store.fs.exists(remote)  # dropped with the work folder once committed
    assert not ray_processes()


def test_the_workers_metrics_reach_the_pipeline_runs_mlflow_run(demo_run, tmp_path):
    """With tracking on, TRL's metrics are logged live by rank 0's Ray worker into the pipeline run's MLflow
    run, as the local training child does."""
    from mlflow import MlflowClient

    from synthtune import tracking
    from tests.support.servers import mlflow_server

    cfg, refs = demo_run
    with mlflow_server(tmp_path) as uri:
        tracked = _on_ray(cfg, max_steps=40, logging_steps=5, seed=23).model_copy(update={
            "tracking": cfg.tracking.model_copy(update={"mlflow_uri": uri, "experiment": "ray"})})
        with tracking.session(tracked, "ray-run", "ray-night") as run:
            train.run(tracked, ArtifactStore(cfg.artifact_root), {"template": refs["template"]}, output_key="ray-mlflow")
        history = MlflowClient(tracking_uri=uri).get_metric_history(run.run_id, "loss")
        assert [h.step for h in history] == list(range(5, 41, 5))  # every logged step, once (rank 0 alone)
    assert not ray_processes()
