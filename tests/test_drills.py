"""Crash and fault drills on the production-shaped stack (PostgreSQL, process workers), and
`synthtune deploy` against it.

Each drill trains long enough to be hit mid-train (`save_steps` small so a checkpoint exists), then
asserts on the run's states, the step training resumed from, how fast the GPU slot came back, and
that no process is left behind.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from tests.support import ROOT
from tests.support.stack import (
    automations,
    client,
    deployed_config,
    latest_attempt,
    run_state,
    start_run,
    states,
    task_runs,
    train_key,
    training_children,
    wait_run,
    with_changes,
)

pytestmark = pytest.mark.ops

SLOT = "gpu:test-worker"
DATA_STEPS = ("preflight", "generate", "filter", "template")


def long_training(stack, seed: int, deployment: str = "synthtune/adhoc") -> tuple[dict, str, object]:
    """A run of the deployed config with a training of its own (~600 steps, a checkpoint every 20):
    (its config, its train key, its flow run id)."""
    config = with_changes(deployed_config(stack), train={"seed": seed, "epochs": 150, "save_steps": 20})
    run_id = start_run(deployment, {"config": config})
    return config, train_key(config, run_id), run_id


def checkpoints(stack, key: str) -> list[int]:
    folder = Path(stack.artifact_root) / "train" / ".work" / key / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def wait_for_checkpoint(stack, key: str, run_id, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while not checkpoints(stack, key):
        assert time.monotonic() < deadline, "no checkpoint written"
        assert run_state(run_id) in {"RUNNING", "PENDING", "SCHEDULED"}, run_state(run_id)
        time.sleep(1)
    return checkpoints(stack, key)[-1]


def slot_free_within(timeout: float) -> float:
    """Seconds until the GPU slot shows no active holder."""
    start = time.monotonic()
    with client() as c:
        while c.read_global_concurrency_limit_by_name(SLOT).active_slots:
            assert time.monotonic() - start < timeout, f"GPU slot still held after {timeout:.0f} s"
            time.sleep(0.5)
    return time.monotonic() - start


def gone(procs: list[psutil.Process], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.drill
def test_a_killed_worker_crashes_its_run_frees_the_slot_and_a_retry_resumes_from_the_checkpoint(stack):
    config, key, run_id = long_training(stack, seed=301)
    step = wait_for_checkpoint(stack, key, run_id)
    children = training_children(key)
    assert children, "training is not running"
    flow_process = [p for p in psutil.Process(stack.named["worker-gpu"].pid).children() if "prefect.engine" in
                    " ".join(p.cmdline())]
    stack.kill("worker-gpu")  # SIGKILL: the worker reports nothing
    killed = time.monotonic()
    try:
        run = wait_run(run_id, timeout=120)
        crashed_after = time.monotonic() - killed
        assert run.state.type.value == "CRASHED", run.state
        slot_free_within(60)
        freed_after = time.monotonic() - killed
        assert gone(children + flow_process), "training or the flow-run process outlived the worker"
        assert crashed_after < 60 and freed_after < 60, (crashed_after, freed_after)
    finally:
        stack.start_worker("gpu")  # the tests after this one need it
    stack.cli("flow-run", "retry", str(run_id))  # the documented one-line Retry
    run = wait_run(run_id, timeout=900, states={"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
    assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-gpu")[-3000:])
    latest = latest_attempt(run_id)
    assert {latest[s] for s in DATA_STEPS} == {"Cached"} and latest["train"] == "Completed"
    summary = _train_summary(stack, key)
    assert summary["resumed_from_step"] >= step > 0, summary  # from the newest valid checkpoint, not from 0
    assert not settled(), settled(0)
    print(f"\nworker kill: Crashed after {crashed_after:.1f} s, GPU slot free after {freed_after:.1f} s, "
          f"resumed from step {summary['resumed_from_step']}")


@pytest.mark.drill
def test_a_machine_that_vanishes_mid_train_is_marked_crashed_by_the_shipped_automation(stack):
    """Worker and flow-run process gone at once, nothing reporting: only the missing heartbeats tell
    (the job template sends one every 30 s; the automation's window here is 45 s, 120 s as shipped)."""
    shipped = automations()
    shipped.apply(unresponsive_after_s=45)
    try:
        config, key, run_id = long_training(stack, seed=304)
        wait_for_checkpoint(stack, key, run_id)
        children = training_children(key)
        flow_process = [p for p in psutil.Process(stack.named["worker-gpu"].pid).children() if "prefect.engine" in
                        " ".join(p.cmdline())]
        assert children and flow_process
        for p in flow_process:  # frozen first, so it cannot see its worker go and end itself
            p.suspend()
        stack.kill("worker-gpu")
        for p in flow_process:
            p.kill()
        vanished = time.monotonic()
        run = wait_run(run_id, timeout=150)
        crashed_after = time.monotonic() - vanished
        assert run.state.type.value == "CRASHED" and "No heartbeat" in run.state.message, run.state
        assert gone(children), "training outlived its flow-run process"
        freed_after = slot_free_within(90) + crashed_after  # the lease is the backstop here
        print(f"\nmachine gone: Crashed by the automation after {crashed_after:.1f} s, slot free after {freed_after:.1f} s")
    finally:
        shipped.apply()  # as shipped: 120 s
        if stack.named["worker-gpu"].poll() is not None:
            stack.start_worker("gpu")
    assert not settled(), settled(0)


def _train_summary(stack, key: str) -> dict:
    import json

    return json.loads((Path(stack.artifact_root) / "train" / key / "manifest.json").read_text())["summary"]


@pytest.mark.drill
def test_cancelling_a_split_run_cancels_its_gpu_child_and_frees_the_gpu(stack):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Cancelling

    config, key, parent = long_training(stack, seed=302, deployment="synthtune/adhoc-split")
    step = wait_for_checkpoint(stack, key, parent)
    children = training_children(key)
    with client() as c:
        [child] = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        c.set_flow_run_state(parent, Cancelling(), force=True)
    cancelled = time.monotonic()
    assert wait_run(parent, timeout=120).state.type.value == "CANCELLED"
    assert wait_run(child.id, timeout=120).state.type.value == "CANCELLED"
    freed = slot_free_within(60)
    assert gone(children), "the GPU child's training outlived the cancel"
    assert step > 0 and time.monotonic() - cancelled < 120 and freed < 60
    assert not settled(), settled(0)  # neither flow-run process outlived its run


@pytest.mark.drill
def test_a_server_restart_mid_train_leaves_the_run_to_finish_and_be_recorded(stack):
    config, key, run_id = long_training(stack, seed=303)
    wait_for_checkpoint(stack, key, run_id)
    stack.kill("server", 15)  # SIGTERM: a restart (an upgrade, a new machine image)
    time.sleep(3)
    stack.start_server()
    run = wait_run(run_id, timeout=900)
    assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-gpu")[-3000:])
    assert states(run_id)["train"] == "Completed" and _train_summary(stack, key)["resumed_from_step"] == 0
    assert slot_free_within(60) < 60
    assert not settled(), settled(0)


def test_synthtune_deploy_reads_back_as_the_config_and_is_idempotent(stack):
    from flows.deploy import portable
    from synthtune.config import load_config

    root = stack.artifact_root
    args = ["deploy", str(ROOT / "configs" / "demo.yaml"), f"artifact_root={root}", "train.epochs=20",
            "--name", "berlin-nightly", "--cron", "0 3 * * *", "--timezone", "Europe/Berlin", "--pool", "gpu"]
    env = {"PREFECT_API_URL": stack.api_url}
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0 and again.output == first.output  # the same deployment, updated in place
    expected = portable(load_config(ROOT / "configs" / "demo.yaml", [f"artifact_root={root}", "train.epochs=20"])
                        .model_dump(mode="json"))
    with client() as c:
        d = c.read_deployment_by_name("synthtune/berlin-nightly")
        [schedule] = c.read_deployment_schedules(d.id)
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", "Europe/Berlin", True)
    assert d.work_pool_name == "gpu" and d.parameters["config"] == expected and d.entrypoint == "flows/pipeline.py:pipeline"
    assert d.global_concurrency_limit.limit == 1
    assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SYNTHTUNE_HOME }}"}}]

    split = CliRunner().invoke(app, [*args[:4], "--name", "berlin-split", "--pool", "gpu", "--split", "--cpu-pool",
                                     "cpu"], env=env)
    assert split.exit_code == 0, split.output
    with client() as c:
        parent, child = (c.read_deployment_by_name(n) for n in ("synthtune/berlin-split", "synthtune-gpu/berlin-split-gpu"))
    assert (parent.work_pool_name, child.work_pool_name) == ("cpu", "gpu")
    assert parent.parameters["gpu_deployment"] == "synthtune-gpu/berlin-split-gpu"


def test_synthtune_deploy_attaches_its_pipeline_s_trigger_and_keeps_another_pipeline_s_name(stack):
    """Finding 14: deployments made by `synthtune deploy` had no trigger, and a second pipeline deployed under
    the first one's name silently replaced it, schedule and concurrency limit dropped."""
    args = ["deploy", str(ROOT / "configs" / "demo.yaml"), f"artifact_root={stack.artifact_root}", "--name",
            "berlin-nightly", "--cron", "0 3 * * *", "--timezone", "Europe/Berlin", "--pool", "gpu"]
    env = {"PREFECT_API_URL": stack.api_url}
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0 and "when seeds arrive for 'demo'" in first.output, first.output
    with client() as c:
        deployment = c.read_deployment_by_name("synthtune/berlin-nightly")
        owned = [a for a in c.read_automations() if a.actions and str(getattr(a.actions[0], "deployment_id", "")) ==
                 str(deployment.id)]
    assert len(owned) == 1 and owned[0].trigger.match.model_dump()["prefect.resource.id"] == "synthtune.pipeline.demo"
    other = [*args[:3], "name=support-bot", *args[3:]]
    refused = CliRunner().invoke(app, other, env=env)
    assert refused.exit_code == 2 and "runs pipeline 'demo'" in " ".join(refused.output.split()), refused.output
    with client() as c:
        kept = c.read_deployment_by_name("synthtune/berlin-nightly")
        [schedule] = c.read_deployment_schedules(kept.id)
    assert kept.parameters["config"]["name"] == "demo" and schedule.schedule.cron == "0 3 * * *"
    assert kept.global_concurrency_limit.limit == 1


@pytest.mark.parametrize("bad, says", [
    (["--pool", "no-such-pool"], "work pool 'no-such-pool' does not exist"),
    (["--cron", "61 * * * *"], "--cron '61 * * * *': not a cron expression"),
    (["--timezone", "Europe/Atlantis"], "--timezone 'Europe/Atlantis': not an IANA timezone"),
    (["train.lora.r=0"], "train.lora.r"),
])
def test_synthtune_deploy_refuses_bad_input_before_creating_anything(stack, bad, says):
    from prefect.exceptions import ObjectNotFound

    name = f"refused-{abs(hash(says)) % 1000}"
    args = ["deploy", str(ROOT / "configs" / "demo.yaml"), f"artifact_root={stack.artifact_root}", "--name", name]
    options = [a for a in bad if "=" not in a]
    overrides = [a for a in bad if "=" in a]
    result = CliRunner().invoke(app, [*args[:3], *overrides, *args[3:], *options], env={"PREFECT_API_URL": stack.api_url})
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    with client() as c, pytest.raises(ObjectNotFound):
        c.read_deployment_by_name(f"synthtune/{name}")


def no_orphans() -> list[str]:
    """synthtune's or Prefect's run processes still alive (flow-run engines, trainers, distilabel)."""
    marks = ("prefect.engine", "_train_child", "synthtune.child", "multiprocessing.spawn")
    out = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        line = " ".join(p.info["cmdline"] or [])
        if any(m in line for m in marks) and p.pid != psutil.Process().pid:
            out.append(f"{p.pid}: {line[:120]}")
    return out


def settled(timeout: float = 30) -> list[str]:
    """The orphans still alive after `timeout` s (processes take a moment to exit after their run ends)."""
    deadline = time.monotonic() + timeout
    while (left := no_orphans()) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def soak(stack, n: int) -> dict:
    """`n` runs queued at once on one GPU slot (nightly and adhoc deployments made by `synthtune deploy`,
    alternating; pairs share their data stages): all complete, their GPU windows never overlap, no
    process is left, and the server answers /api/health throughout. Returns the numbers."""
    import threading

    import httpx

    root = stack.artifact_root
    for name, cron in (("soak-nightly", ["--cron", "0 4 * * *", "--timezone", "UTC"]), ("soak-adhoc", [])):
        result = CliRunner().invoke(app, ["deploy", str(ROOT / "configs" / "demo.yaml"), f"artifact_root={root}",
                                          "train.epochs=20", "--name", name, *cron], env={"PREFECT_API_URL": stack.api_url})
        assert result.exit_code == 0, result.output
    with client() as c:
        base = c.read_deployment_by_name("synthtune/soak-adhoc").parameters["config"]
    health, stop = [], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                health.append(httpx.get(f"{stack.api_url}/health", timeout=5).status_code)
            except httpx.HTTPError as e:
                health.append(repr(e))
            time.sleep(1)

    threading.Thread(target=poll, daemon=True).start()
    started = time.monotonic()
    runs = []
    for i in range(n):
        config = with_changes(base, train={"seed": 400 + i, "epochs": 20},
                              filter={"min_tokens": 3 + i // 2})  # pairs share generate .. template
        runs.append(start_run("synthtune/soak-nightly" if i % 2 else "synthtune/soak-adhoc", {"config": config}))
    finished = [wait_run(r, timeout=300 * n) for r in runs]
    wall = time.monotonic() - started
    stop.set()
    assert all(r.state.type.value == "COMPLETED" for r in finished), [r.state for r in finished]
    windows = []
    for r in finished:
        tasks = task_runs(r.id, 8)
        gpu = [t for name, t in tasks.items() if name == "train" or name.startswith("evaluate[")]
        windows.append((min(t.start_time for t in gpu), max(t.end_time for t in gpu)))
    windows.sort()
    gaps = [(b[0] - a[1]).total_seconds() for a, b in zip(windows, windows[1:], strict=False)]
    assert all(g >= 0 for g in gaps), f"GPU windows overlap: {windows}"
    assert all(h == 200 for h in health) and health, [h for h in health if h != 200][:5]
    assert not settled(), settled(0)
    busy = sum((b - a).total_seconds() for a, b in windows)
    report = {"runs": n, "wall_s": round(wall, 1), "gpu_busy_s": round(busy, 1), "slot_idle_between_runs_s": round(
        sum(gaps), 1), "max_gap_s": round(max(gaps, default=0), 1), "health_checks": len(health)}
    print(f"\nsoak: {report}")
    (Path(stack.home) / f"soak-{n}.json").write_text(__import__("json").dumps(report))
    return report


@pytest.mark.drill
def test_soak_small(stack):
    """The CI-sized soak: three runs."""
    soak(stack, 3)


@pytest.mark.soak
def test_soak(stack):
    """Six runs queued at once (pytest -m soak -s prints the numbers)."""
    soak(stack, 6)


def test_the_cli_prints_nothing_but_its_lines_on_deploy(stack):
    out = subprocess.run([str(Path(sys.executable).parent / "synthtune"), "deploy", str(ROOT / "configs" / "demo.yaml"),
                          f"artifact_root={stack.artifact_root}", "--name", "quiet"], env=stack.env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("synthtune/quiet: pool gpu, no schedule, id ") and not out.stderr.strip()
