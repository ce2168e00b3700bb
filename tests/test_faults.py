"""`synthtune run` as a laptop user meets it, with its embedded Prefect server (the default): what
the terminal shows, Ctrl-C during training, `kill -9` of the command, the run after both, and a
failing run.

One artifact root and one PREFECT_HOME across the module, as on a laptop: the demo runs whole
(quietly), then a longer training run is interrupted, the next resumes and is killed, and the one
after must get the GPU slot at once (its dead holder reported), resume from the newest checkpoint
and finish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.support import DEMO, ROOT

pytestmark = pytest.mark.flows

# ~600 optimizer steps with a checkpoint every 20: long enough to interrupt, short enough to finish
TRAIN = ["train.epochs=150", "train.save_steps=20"]


# what third-party libraries print during a run: the run's log file gets it, the terminal never does
NOISE = ("gemm_4bit_forward", "FutureWarning", "UnsupportedFieldAttributeWarning", "Untracked error", "{'loss'",
         "it/s]", "examples/s]", "Traceback")


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """An artifact root and a PREFECT_HOME of their own."""
    base = tmp_path_factory.mktemp("laptop")
    root = base / "artifacts"
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect-home"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    return {"root": root, "env": env, "pids": {}}


def start(laptop, *overrides: str) -> subprocess.Popen:
    """`synthtune run` as a terminal starts it: a process group of its own (Ctrl-C goes to the group)."""
    cmd = [str(Path(sys.executable).parent / "synthtune"), "run", str(DEMO), f"artifact_root={laptop['root']}",
           *(overrides or TRAIN)]
    return subprocess.Popen(cmd, cwd=ROOT, env=laptop["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def checkpoints(root: Path) -> list[Path]:
    return sorted(root.glob("train/.work/*/checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def wait_for_checkpoint_after(root: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        done = [int(p.name.split("-")[1]) for p in checkpoints(root) if (p / "trainer_state.json").is_file()]
        if done and max(done) > step:
            return max(done)
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint after step {step} within {timeout} s")


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def kinds(procs: list[psutil.Process]) -> set[str]:
    out = set()
    for p in procs:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        out |= {k for k, mark in (("server", "server start"), ("trainer", "_train_child")) if mark in line}
    return out


def leases(laptop) -> list[dict]:
    """The leases on a concurrency limit the embedded server keeps on disk (the GPU slot while held;
    Prefect's own per-task-run leases name no limit)."""
    found = [json.loads(p.read_text()) for p in (Path(laptop["env"]["PREFECT_HOME"]) / "concurrency_leases").glob("*.json")
             if p.name != "expirations.json"]
    return [lease for lease in found if lease["resource_ids"]]


def staging(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"synthtune-*-{pid}-*"))


def test_the_terminal_shows_each_stage_and_the_summary_and_no_library_noise(laptop):
    from synthtune.runner import DAG

    proc = start(laptop, "name=demo")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    terminal = out + err
    assert not [n for n in NOISE if n in terminal], terminal
    assert "flow run " not in terminal  # the embedded server has no page to link to
    lines = out.splitlines()
    for step in DAG:  # one line as it starts, one as it ends (non-TTY)
        starts = [line for line in lines if line.split()[:2] == [step.name, "running"]]
        ends = [line for line in lines if line.split()[:2] == [step.name, "Completed"]]
        skips = [line for line in lines if line.split()[:2] == [step.name, "Skipped"]]
        if step.name == "evaluate[champion]":  # the first night has no champion
            assert not starts and not ends and len(skips) == 1 and "no other champion" in skips[0], out
        else:
            assert len(starts) == len(ends) == 1 and not skips, (step.name, out)
    assert any("loss" in line and "steps" in line for line in lines if line.startswith("train "))
    assert "synthtune 'demo' in" in out and "PROMOTED" in out
    log = Path(lines[-1].removeprefix("log: "))
    assert log.parent == laptop["root"] / "logs" and log.is_file()
    assert [n for n in NOISE[:6] if n in log.read_text()], "the libraries' output should be in the log"


def test_ctrl_c_during_training_stops_it_in_seconds_and_says_where_the_checkpoints_are(laptop):
    proc = start(laptop)
    step = wait_for_checkpoint_after(laptop["root"], 0, proc)
    children = descendants(proc)
    assert kinds(children) == {"server", "trainer"}
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, (out, err)
    assert took < 20, f"Ctrl-C took {took:.0f} s"
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "left running"
    last = err.strip().splitlines()[-1]
    assert "interrupted during train" in last and "checkpoint-" in last and "resumes from it" in last, err
    assert "Traceback" not in err and "ConnectError" not in err, err[-3000:]
    assert not leases(laptop), "the GPU slot's lease was not released"
    laptop["pids"]["interrupted"], laptop["step"] = proc.pid, step


@pytest.mark.drill
def test_kill_9_leaves_no_server_trainer_or_staging_and_the_next_run_takes_the_slot_at_once(laptop):
    if "interrupted" not in laptop["pids"]:
        pytest.skip("needs the Ctrl-C drill's checkpoints")
    proc = start(laptop)
    wait_for_checkpoint_after(laptop["root"], laptop["step"], proc)
    children = descendants(proc)
    assert kinds(children) == {"server", "trainer"}
    assert staging(proc.pid), "expected the run's staging folders while it trains"
    proc.kill()  # kill -9: no handler runs
    proc.communicate()
    deadline = time.monotonic() + 20
    while (alive := [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive, f"orphaned: {kinds(alive)}"
    assert leases(laptop), "a killed holder cannot release its lease: the next run must reclaim it"
    killed = proc.pid

    proc = start(laptop)
    started = time.monotonic()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert not staging(killed), "the killed run's staging folders were not swept"
    log = max(laptop["root"].glob("logs/*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "stale holder (flow run" in log and f"process {killed} on" in log, log[-3000:]
    waited = _seconds_between(log, "waiting for GPU slot", "holding GPU slot")
    assert waited < 5, f"waited {waited:.0f} s for a slot whose holder was dead"
    manifest = max(laptop["root"].glob("train/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(manifest.read_text())["summary"]
    assert summary["resumed_from_step"] > laptop["step"], summary  # from the killed run's newest checkpoint
    assert not leases(laptop)
    assert time.monotonic() - started < 400


def _seconds_between(log: str, first: str, second: str) -> float:
    """Seconds between the first log lines containing `first` and `second` (`HH:MM:SS.fff | ...`)."""
    def at(text: str) -> float:
        line = next(line for line in log.splitlines() if text in line)
        h, m, s = line.split(" ")[0].split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    return at(second) - at(first)


def test_a_failing_run_ends_with_its_one_real_message_and_keeps_the_traceback_in_the_log(laptop):
    cmd = [str(Path(sys.executable).parent / "synthtune"), "run", str(DEMO), f"artifact_root={laptop['root']}",
           "preflight.min_free_gb=1000000"]
    done = subprocess.run(cmd, cwd=ROOT, env=laptop["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done
    terminal = done.stdout + done.stderr
    assert "Traceback" not in terminal and len(terminal.splitlines()) < 30, terminal
    tail = done.stderr.strip().splitlines()
    assert tail[0].startswith("preflight failed after") and "GiB free" in done.stderr, done.stderr
    assert "preflight.min_free_gb asks for 1000000.00 GiB. Free space or point artifact_root elsewhere." in done.stderr
    assert tail[-1].startswith("full log: ")
    log = Path(tail[-1].removeprefix("full log: ")).read_text()
    assert "Traceback" in log and "PreflightError" in log

    verbose = subprocess.run([*cmd, "-v"], cwd=ROOT, env=laptop["env"], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 1 and "Traceback" in verbose.stdout + verbose.stderr


@pytest.mark.flows
def test_a_run_against_a_prefect_server_prints_its_flow_run_page(laptop, _prefect_harness):
    """`synthtune run` with PREFECT_API_URL set prints the run's page, named `{pipeline}-{date}`, first."""
    import datetime as dt

    env = {**laptop["env"], "PREFECT_API_URL": _prefect_harness}
    cmd = [str(Path(sys.executable).parent / "synthtune"), "run", str(DEMO), f"artifact_root={laptop['root']}-server",
           "preflight.min_free_gb=1000000"]  # stops at preflight: the page is printed before any stage
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done
    name = f"demo-{dt.datetime.now(dt.UTC):%Y-%m-%d}"
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(f"flow run {name}: ")), None)
    assert line is not None and "/runs/flow-run/" in line, done.stdout
