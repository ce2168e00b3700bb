"""Deployments on a real Prefect server: schedule, split pools, one run per GPU, cancellation, S3.

Everything goes through `deployments/prefect.yaml` as deployed by `prefect deploy --all`, process
workers started with `prefect worker start`, and the server's API (see tests/prefect_stack.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.support import ROOT
from tests.support.stack import (
    automations,
    client,
    deployed_config,
    latest_attempt,
    start_run,
    states,
    task_runs,
    wait_run,
    with_changes,
)

pytestmark = pytest.mark.ops

SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
GPU_STEPS = {"train", "evaluate[base]", "evaluate[tuned]"}
DATA_STEPS = {"preflight", "generate", "filter", "template"}


def test_deployments_schedule_and_a_scheduled_run_pulled_forward(stack):
    from prefect.states import Scheduled

    spec = {d["name"]: d for d in SPEC["deployments"]}
    with client() as c:
        nightly = c.read_deployment_by_name("synthtune/nightly")
        adhoc = c.read_deployment_by_name("synthtune/adhoc")
        pool = c.read_work_pool("gpu")
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (spec["nightly"]["schedules"][0]["cron"],
                                                                    spec["nightly"]["schedules"][0]["timezone"])
    assert schedule.active and not adhoc.schedules
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.work_pool_name == adhoc.work_pool_name == "gpu"
    assert nightly.parameters["config"]["artifact_root"] == stack.artifact_root  # filled in at deploy time
    assert pool.base_job_template["variables"]["properties"]["env"]["default"]["TOKENIZERS_PARALLELISM"] == "false"

    # the server takes the Kubernetes and Docker GPU templates as work pools of their type
    for kind, template in (("kubernetes", "kubernetes-gpu"), ("docker", "docker-gpu")):
        stack.cli("work-pool", "create", template, "--type", kind, "--base-job-template",
                  str(ROOT / "deployments" / "job-templates" / f"{template}.json"))
        with client() as c:
            props = c.read_work_pool(template).base_job_template["variables"]["properties"]
        assert {"gpu_count", "tolerations"} <= set(props) if kind == "kubernetes" else "container_create_kwargs" in props

    # the scheduler service creates the upcoming runs, at 02:00 in the schedule's timezone
    deadline = time.monotonic() + 60
    while True:
        with client() as c:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
            upcoming = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))
        upcoming = sorted((r for r in upcoming if r.state.name == "Scheduled"), key=lambda r: r.expected_start_time)
        if upcoming or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert upcoming, "the scheduler created no nightly runs"
    tz = ZoneInfo(schedule.schedule.timezone)
    assert all(r.expected_start_time.astimezone(tz).strftime("%H:%M") == "02:00" for r in upcoming)
    assert upcoming[0].expected_start_time > datetime.now(UTC)

    nxt = upcoming[0]
    with client() as c:  # pull the next nightly forward: it runs now, on the gpu pool's worker
        c.set_flow_run_state(nxt.id, Scheduled(scheduled_time=datetime.now(UTC) - timedelta(seconds=1)),
                             force=True)
    run = wait_run(nxt.id, timeout=900)
    assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-gpu")[-4000:])
    assert run.parameters == nightly.parameters
    assert set(states(run.id, 8).values()) <= {"Completed", "Cached"}
    assert (Path(stack.artifact_root) / "registry" / run.parameters["config"]["name"] / "latest.json").is_file()


def test_split_mode_runs_train_and_evaluate_on_the_gpu_pool(stack):
    run = wait_run(start_run("synthtune/adhoc-split"), timeout=900)
    assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-cpu")[-3000:])
    with client() as c:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
        [child] = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        gpu_deployment = c.read_deployment(child.deployment_id)
    assert (gpu_deployment.name, gpu_deployment.work_pool_name, run.work_pool_name) == ("gpu-stages", "gpu", "cpu")
    assert child.state.type.value == "COMPLETED"
    parent_steps, child_steps = set(task_runs(run.id)), set(task_runs(child.id, 3))
    # evaluate[champion] too when an earlier test on this stack promoted a model
    assert child_steps - {"evaluate[champion]"} == GPU_STEPS
    assert DATA_STEPS | {"promote"} <= parent_steps and not parent_steps & (GPU_STEPS | {"evaluate[champion]"})


def _gpu_window(run_id) -> tuple[datetime, datetime]:
    runs = task_runs(run_id, 8)
    gpu = [runs[name] for name in GPU_STEPS]
    return min(r.start_time for r in gpu), max(r.end_time for r in gpu)


def test_two_runs_on_one_gpu_slot_never_overlap_in_gpu_stages(stack):
    base = deployed_config(stack)
    ids = [start_run("synthtune/adhoc", {"config": with_changes(base, train={"seed": seed, "epochs": 20})})
           for seed in (101, 102)]
    runs = [wait_run(i, timeout=900) for i in ids]
    assert all(r.state.type.value == "COMPLETED" for r in runs), [r.state for r in runs]
    assert all(states(r.id, 8)["train"] == "Completed" for r in runs)  # both really trained
    (a0, a1), (b0, b1) = sorted(_gpu_window(r.id) for r in runs)
    assert a1 <= b0, f"GPU stages overlapped: {a0}..{a1} and {b0}..{b1}"
    with client() as c:
        slot = c.read_global_concurrency_limit_by_name("gpu:test-worker")
    assert slot.limit == 1 and slot.active_slots == 0


HOLD = """
import time
from prefect import flow
from tasks.gpu_slot import hold

@flow
def holder():
    with hold("gpu:crash-test", lease_s=60):
        print("HOLDING", flush=True)
        time.sleep(600)

holder()
"""


@pytest.mark.drill
def test_a_crashed_holder_gives_the_gpu_slot_back_when_its_lease_runs_out(stack):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD], env=stack.env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        while (line := proc.stdout.readline()) and "HOLDING" not in line:
            pass
        assert "HOLDING" in line, "the holder never got the slot"
        with client() as c:
            assert c.read_global_concurrency_limit_by_name("gpu:crash-test").active_slots == 1
        proc.kill()  # SIGKILL: no chance to release
        proc.wait()
        killed = time.monotonic()
        with client() as c:
            while c.read_global_concurrency_limit_by_name("gpu:crash-test").active_slots:
                assert time.monotonic() - killed < 150, "the slot never came back"
                time.sleep(2)
    finally:
        proc.kill()
    assert time.monotonic() - killed > 5  # freed by the lease running out, not by the holder


def test_s3_artifact_root_and_a_retry_in_another_process_finds_finished_stages(stack):
    import s3fs
    from prefect.states import AwaitingRetry

    fs = s3fs.S3FileSystem()
    fs.mkdir("synthtune-ops")
    root = "s3://synthtune-ops/nightly"
    config = with_changes(deployed_config(stack), artifact_root=root)
    run_id = start_run("synthtune/adhoc", {"config": config, "fail_stage": "train"})
    first = wait_run(run_id, timeout=900)
    assert first.state.type.value == "FAILED", first.state
    done = {n for n, s in states(run_id).items() if s == "Completed"}
    assert DATA_STEPS <= done and "train" not in done
    assert all(fs.glob(f"{root}/{stage}/*/manifest.json") for stage in ("generate", "filter", "template"))
    assert not fs.exists(f"{root}/.prefect-results")  # the manifests are the cache: no Prefect result is kept

    with client() as c:  # the retry: a new flow-run process started by the worker
        c.set_flow_run_state(run_id, AwaitingRetry(), force=True)
    run = wait_run(run_id, timeout=900, states={"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
    assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-gpu")[-3000:])
    assert run.run_count == 2
    latest = latest_attempt(run_id)
    assert {latest[n] for n in DATA_STEPS} == {"Cached"}
    assert latest["train"] == "Completed"
    assert fs.exists(f"{root}/registry/{config['name']}/latest.json") and fs.exists(f"{root}/train")


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1 that keeps every POST body."""

    def __init__(self):
        import http.server
        import threading

        self.posts: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                import json

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.posts.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 90, settle: float = 10) -> list[dict]:
        """The POSTs once there are `n`, after `settle` more seconds in which no other may arrive."""
        deadline = time.monotonic() + timeout
        while len(self.posts) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(settle)
        return list(self.posts)


def test_a_failed_nightly_and_a_promotion_each_post_one_notification(stack):
    receiver = WebhookReceiver()
    automations().apply(receiver.url, allow_private_urls=True)
    failed = wait_run(start_run("synthtune/nightly", {"config": deployed_config(stack), "fail_stage": "preflight"}),
                      timeout=300)
    assert failed.state.type.value == "FAILED"
    posts = receiver.wait_for(1)
    assert len(posts) == 1 and "ended Failed" in posts[0]["text"] and failed.name in posts[0]["text"]

    # a new decision (a looser tolerance is a new promote key; every other stage comes back cached) that promotes
    config = with_changes(deployed_config(stack), promote={"min_delta_vs_champion": -1.0})
    run = wait_run(start_run("synthtune/adhoc", {"config": config}), timeout=600)
    assert run.state.type.value == "COMPLETED" and run.state.name == "Completed", run.state
    posts = receiver.wait_for(2)
    assert len(posts) == 2 and "is the new champion" in posts[1]["text"]
    assert states(run.id)["promote"] == "Completed"


def test_seeds_arriving_three_times_in_the_debounce_window_start_one_run(stack):
    import subprocess
    import sys
    from datetime import UTC, datetime

    with client() as c:
        nightly = c.read_deployment_by_name("synthtune/nightly")

    def triggered() -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with client() as c:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))
        # the trigger schedules its run 10 minutes out; the cron's runs are at 02:00 Berlin
        return [r for r in runs if r.state.name == "Scheduled" and r.created > started]

    started = datetime.now(UTC)
    cli = str(Path(sys.executable).parent / "synthtune")
    for _ in range(3):  # three files landing within the window
        out = subprocess.run([cli, "seeds-arrived", str(ROOT / "configs" / "demo.yaml"), "name=nightly"],
                             env=stack.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 60
    while not triggered() and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(10)  # any further run would have been created by now
    runs = triggered()
    assert len(runs) == 1, runs
    assert (runs[0].expected_start_time - started).total_seconds() > 300  # scheduled after the burst
    with client() as c:
        c.delete_flow_run(runs[0].id)  # it would run the whole loop ten minutes from now
