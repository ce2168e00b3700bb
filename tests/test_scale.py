"""Training on more than one process, for real on this CPU: `train.num_processes: 2` runs two ranks
(torch's launcher, gloo), each on half of every global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthtune.stages import train
from synthtune.stages.train import latest_valid_checkpoint, per_rank, work_dir
from synthtune.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def test_the_global_batch_is_split_between_the_ranks():
    assert per_rank(8, 1, 1) == (8, 1)
    assert per_rank(8, 1, 2) == (4, 1)  # the micro-batch halves ...
    assert per_rank(4, 2, 2) == (4, 1)  # ... or, first, the accumulation
    assert per_rank(2, 6, 4) == (1, 3)
    with pytest.raises(ValueError, match=r"train.num_processes=3 must divide the global batch train.batch_size x "
                                         r"train.gradient_accumulation_steps = 4 x 1"):
        per_rank(4, 1, 3)


def test_on_a_cpu_the_ranks_start_under_torch_launcher(tmp_path):
    spec = tmp_path / "spec.json"
    cmd = train.launch_command(spec, 2, False, "cpu")
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[-3:] == ["-m", "synthtune.stages._train_child", str(spec)]


def test_ray_training_settings_are_checked_and_in_no_key(demo_cfg):
    from synthtune.config import ConfigError, load_config
    from synthtune.runner import plan
    from tests.support import DEMO

    on_ray = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={
        "engine": "ray", "num_workers": 4, "ray_address": "ray://head:10001", "ray_gpus_per_worker": 1})})
    assert plan(on_ray) == plan(demo_cfg)  # where it trains is not what it trains
    assert on_ray.train.ranks == 4 and demo_cfg.train.ranks == 1
    with pytest.raises(ConfigError, match=r"train.engine: ray runs train.num_workers workers \(ranks\); leave "
                                          r"train.num_processes at 1 \(it is 2\)"):
        load_config(DEMO, ["train.engine=ray", "train.num_processes=2"])
    with pytest.raises(ValueError, match=r"train.num_workers=3 must divide the global batch"):
        per_rank(8, 1, 3, "train.num_workers")


def test_evaluation_ranks_start_under_torch_launcher_on_a_cpu_and_accelerate_on_gpus(tmp_path):
    from synthtune.stages import evaluate

    spec = tmp_path / "spec.json"
    cpu = evaluate.launch_command(spec, 2, "cpu")
    assert cpu[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cpu[-3:] == ["-m", "synthtune.stages._evaluate_ranks", str(spec)]
    gpus = evaluate.launch_command(spec, 8, "cuda")
    assert gpus[1:7] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "8", "-m"]


def test_evaluation_processes_are_in_no_key_and_vllm_takes_them_as_data_parallel(demo_cfg, tmp_path):
    from synthtune.runner import plan
    from synthtune.stages.evaluate import lm_eval_args

    two = demo_cfg.model_copy(update={"evaluate": demo_cfg.evaluate.model_copy(update={"num_processes": 2})})
    assert plan(two) == plan(demo_cfg)  # the same scores: the same keys, cached across the change
    vllm = two.model_copy(update={"evaluate": two.evaluate.model_copy(update={"backend": "vllm"})})
    assert lm_eval_args(vllm, None, tmp_path)["model_args"]["data_parallel_size"] == 2
    assert "data_parallel_size" not in lm_eval_args(two, None, tmp_path)["model_args"]


def _short(cfg, **update):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "epochs": 6, "logging_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 2, "seed": 5, **update})})


def _losses(ref) -> list[float]:
    return [h["loss"] for h in json.loads(Path(f"{ref.uri}/loss_history.json").read_text()) if "loss" in h]


@pytest.mark.integration
def test_two_ranks_train_what_one_process_does(demo_run):
    cfg, refs = demo_run
    store = ArtifactStore(cfg.artifact_root)
    one = train.run(_short(cfg), store, {"template": refs["template"]}, output_key="ddp-one")
    two = train.run(_short(cfg, num_processes=2), store, {"template": refs["template"]}, output_key="ddp-two")
    ranks = two.summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["steps"] == ranks[1]["steps"] == one.summary["steps"] > 0  # both ranks stepped, every step
    assert ranks[0]["examples"] + ranks[1]["examples"] == one.summary["ranks"][0]["examples"]  # each took half
    assert sorted(p.name for p in Path(two.uri, "adapter").glob("adapter_*")) == [
        "adapter_config.json", "adapter_model.safetensors"]  # one adapter, written once
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) >= 5
    # the same global batches in the same order: the curves agree to float rounding of the gradient all-reduce
    assert max(abs(x - y) / x for x, y in zip(a, b, strict=True)) < 1e-3
    assert two.summary["trainable_params_changed"] == two.summary["trainable_params"]


def _rank_pids(work: Path) -> dict[int, int]:
    """rank -> pid of the training ranks of the run in `work` (from their environment)."""
    found = subprocess.run(["pgrep", "-f", f"synthtune.stages._train_child {work}"], capture_output=True, text=True)
    out = {}
    for pid in found.stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(pid)
    return out


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def _start(cfg, refs) -> subprocess.Popen:
    script = ("from synthtune.config import PipelineConfig; from synthtune.store import ArtifactStore, ArtifactRef\n"
              f"from synthtune.stages import train\ncfg = PipelineConfig.model_validate_json({cfg.model_dump_json()!r})\n"
              "train.run(cfg, ArtifactStore(cfg.artifact_root), "
              f"{{'template': ArtifactRef.model_validate_json({refs['template'].model_dump_json()!r})}})\n")
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_checkpoint(work: Path, timeout: float = 180) -> Path:
    deadline = time.time() + timeout
    while latest_valid_checkpoint(work / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.2)
    ckpt = latest_valid_checkpoint(work / "checkpoints")
    assert ckpt is not None, "no checkpoint appeared"
    return ckpt


@pytest.mark.integration
def test_a_rank_killed_mid_run_ends_the_run_and_the_retry_resumes_from_the_checkpoint(demo_run):
    cfg, refs = demo_run
    long = _short(cfg, num_processes=2, max_steps=90, save_steps=10, save_total_limit=2, seed=9)
    store = ArtifactStore(cfg.artifact_root)
    k = train.key(long, {"template": refs["template"].digest})
    work = work_dir(store, k)
    stage = _start(long, refs)
    killed_at = _wait_for_checkpoint(work)
    ranks = _rank_pids(work)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies hard: the launcher ends the other, the stage fails
    assert stage.wait(timeout=60) != 0
    time.sleep(1.0)
    assert not any(_alive(pid) for pid in ranks.values()) and store.ref("train", k) is None

    ref = train.run(long, store, {"template": refs["template"]})  # the retry, on two ranks again
    resumed = ref.summary["resumed_from_step"]
    assert resumed >= int(killed_at.name.split("-")[1]) > 0 and ref.summary["steps"] == 90
    assert ref.summary["first_step_this_run"] == resumed + 1 and len(ref.summary["ranks"]) == 2
    assert not work.exists()


@pytest.mark.integration
def test_killing_the_stage_leaves_no_rank_alive(demo_run):
    """A cancelled flow run, a Ctrl-C or a killed worker ends the stage's process; no rank outlives it."""
    cfg, refs = demo_run
    long = _short(cfg, num_processes=2, max_steps=300, save_steps=15, seed=13)
    work = work_dir(ArtifactStore(cfg.artifact_root), train.key(long, {"template": refs["template"].digest}))
    stage = _start(long, refs)
    _wait_for_checkpoint(work)
    ranks = _rank_pids(work)
    assert sorted(ranks) == [0, 1], ranks
    stage.send_signal(signal.SIGKILL)  # only the stage's own process: its launcher and ranks must follow
    stage.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in ranks.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks.values()), f"ranks outlived the stage: {ranks}"
    subprocess.run(["pkill", "-9", "-f", f"synthtune.stages._train_child {work}"], check=False)  # tidy on failure


@pytest.mark.integration
def test_two_evaluation_ranks_score_what_one_process_does(demo_run):
    """lm-eval data-parallel on two gloo ranks: each scores half of every task, and the numbers, base and
    tuned, are those of one process, to the last digit, item by item."""
    from synthtune.stages import evaluate

    cfg, refs = demo_run
    store = ArtifactStore(cfg.artifact_root)
    two = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"num_processes": 2})})
    for model, upstream in (("base", {}), ("tuned", {"train": refs["train"]})):
        one = refs[f"evaluate[{model}]"]
        ref = evaluate.run(two, store, upstream, output_key=f"dp-two-{model}")
        assert ref.summary["scores"] == one.summary["scores"], model
        (alone,), ranks = one.summary["ranks"], ref.summary["ranks"]
        assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
        # each rank scored about half of what one process scored (lm-eval pads the shorter share)
        assert all(0 < r["requests"] < alone["requests"] for r in ranks)
        assert alone["requests"] <= sum(r["requests"] for r in ranks) <= alone["requests"] + 4
        for task in ("demo_facts", "forgetting"):
            ours, theirs = (Path(f"{r.uri}/samples_{task}.jsonl").read_text().splitlines() for r in (ref, one))
            assert [json.loads(x)["filtered_resps"] for x in ours] == [json.loads(x)["filtered_resps"] for x in theirs]
            assert [json.loads(x)["doc_id"] for x in ours] == sorted(json.loads(x)["doc_id"] for x in theirs)


def test_preflight_counts_the_requests_lm_eval_will_score(demo_cfg):
    from synthtune.eval_tasks import task_requests

    ec = demo_cfg.evaluate
    assert task_requests(ec) == (32 * 4 + 16, [])  # 32 questions of 4 choices, 16 forgetting paragraphs
    assert task_requests(ec.model_copy(update={"limit": 5})) == (5 * 4 + 16, [])
    more = ec.model_copy(update={"tasks": [*ec.tasks, "hellaswag"], "in_domain": True})
    assert task_requests(more) == (32 * 4 + 16, ["hellaswag", "in_domain"])  # not countable before the night


@pytest.mark.integration
def test_preflight_says_when_evaluation_will_dominate_the_night(demo_run, tmp_path):
    """Timed by the demo night on this root: its tasks take less than its training; a task 200x the size
    would not, and preflight says so with the figures, before anything runs."""
    import shutil

    from synthtune.stages.preflight import estimate_warning, evaluation_estimate

    cfg, refs = demo_run
    store = ArtifactStore(cfg.artifact_root)
    small = evaluation_estimate(cfg, store)
    assert small["requests_per_model"] == refs["evaluate[tuned]"].summary["ranks"][0]["requests"] == 144
    assert small["seconds_per_request"] > 0 and small["train_s"] > 0 and not small["dominates"]
    assert estimate_warning(small) is None

    tasks = shutil.copytree(ROOT / "configs" / "eval_tasks", tmp_path / "tasks")
    data = tasks / "demo_facts.jsonl"
    data.write_text(data.read_text() * 200)
    big = evaluation_estimate(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"task_dir": tasks})}),
                              store)
    assert big["requests_per_model"] == 200 * 32 * 4 + 16
    assert big["dominates"] and big["evaluate_s"] > big["train_s"] == small["train_s"]
    assert estimate_warning(big).startswith(
        f"evaluation will dominate the night: about {big['evaluate_s']:.0f} s per model to score 25616 requests")
