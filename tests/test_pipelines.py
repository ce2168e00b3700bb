"""Many pipelines on one artifact root, end to end on a real Prefect server: each has its own registry and
champion, gc of one never touches another's, and gc during a run never deletes what the run uses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from synthtune.registry import Registry
from synthtune.store import ArtifactStore
from tests.support import DEMO, ROOT

pytestmark = pytest.mark.flows


def _night(cfg, epochs: float, **train):
    """One nightly flow run; (final state, outputs)."""
    from flows.pipeline import pipeline

    night = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs, **train})})
    state = pipeline(night, return_state=True)
    assert state.is_completed(), state
    return state, state.result()


def _cli(*args):
    return CliRunner().invoke(app, list(args))


def _lineage_intact(store: ArtifactStore, train_key: str) -> list[str]:
    """Problems with an adapter and the data behind it (template, filter, generate)."""
    out = store.problems("train", train_key)
    stage, key = "train", train_key
    for upstream in ("template", "filter", "generate"):
        key = store.manifest(stage, key)["upstream"][upstream]
        stage = upstream
        out += store.problems(stage, key)
    return out


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.drill)])
def shared_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_two_pipelines_on_one_root_each_keep_their_own_champion(prefect_server, demo_cfg, shared_root):
    demo = demo_cfg.model_copy(update={"artifact_root": shared_root})
    bot = demo.model_copy(update={"name": "support-bot"})
    store = ArtifactStore(shared_root)
    demo_registry, bot_registry = Registry(store, "demo"), Registry(store, "support-bot")

    _, night1 = _night(demo, 10)
    a1 = night1["train"].key
    assert demo_registry.champion()["train_key"] == a1
    _, bot1 = _night(bot, 10, seed=5)  # another adapter: gated against base, never against the demo's champion
    b1 = bot1["train"].key
    assert b1 != a1 and bot1["promote"].summary["reasons"][0] == "no champion yet: the gate is vs base only"
    assert bot_registry.champion()["train_key"] == b1 and demo_registry.champion()["train_key"] == a1
    _, night2 = _night(demo, 20)  # a better demo candidate: promotions in one never touch the other
    a2 = night2["train"].key
    assert night2["promote"].summary["outcome"] == f"PROMOTED: {a2} replaces {a1}"
    assert demo_registry.champion()["train_key"] == a2 and bot_registry.champion()["train_key"] == b1

    root = f"artifact_root={shared_root}"
    result = _cli("rollback", str(DEMO), root)  # rollback in one leaves the other alone
    assert result.exit_code == 0, result.output
    assert demo_registry.champion()["train_key"] == a1 and bot_registry.champion()["train_key"] == b1

    result = _cli("gc", str(DEMO), root, "--keep", "0")
    assert result.exit_code == 0, result.output
    assert not _lineage_intact(store, b1) and not _lineage_intact(store, a1)  # both champions, with their data
    assert "the candidate of demo's newest decision" in result.output  # a2: the newest night stays inspectable
    assert bot_registry.champion()["train_key"] == b1 and not bot_registry.problems()[0]
    listed = _cli("models", "--root", shared_root)
    assert listed.exit_code == 0 and {a1, b1} <= set(listed.output.split())


def test_gc_during_a_run_keeps_what_the_run_uses(copied, tmp_path):
    """A run trains on new data while `gc --keep 0` runs, after a registry event newer than that data: the
    run completes and promotes, and its lineage verifies."""
    cfg, refs = copied
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for path in Path(cfg.generate.seeds).iterdir():
        (seeds / path.name).write_text(path.read_text())
    (seeds / "night2.jsonl").write_text('{"id": "new-1", "prompt": "What is the capital of Vardon?!"}\n')
    root = f"artifact_root={cfg.artifact_root}"
    args = [str(DEMO), root, f"generate.seeds={seeds}", "train.epochs=150", "train.save_steps=20",
            "promote.min_delta_vs_champion=-1.0"]
    run = subprocess.Popen([str(Path(sys.executable).parent / "synthtune"), "run", *args, "--engine", "local"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = Path(cfg.artifact_root) / "train" / ".work"
    deadline = time.monotonic() + 300
    while not list(work.glob("*/checkpoints/checkpoint-*/trainer_state.json")):
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.5)
    store = ArtifactStore(cfg.artifact_root)
    Registry(store, "demo").decide({"id": "late", "train_key": "elsewhere", "promoted": False, "scores": {}})
    result = _cli("gc", *args[:2], "--keep", "0")  # everything not pinned, while the run trains
    assert result.exit_code == 0, result.output
    assert "in use by run" in result.output
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, (out[-3000:], err[-3000:])
    champion = Registry(store, "demo").champion()
    assert champion["train_key"] != refs["train"].key and "PROMOTED" in out  # the run's adapter is in service
    assert not _lineage_intact(store, champion["train_key"])
    verified = _cli("verify", *args)
    assert verified.exit_code == 0, verified.output


# --------------------------------------------------------------------------- the kill drill over the registry

KILL_AT = """
import os, signal
import synthtune.registry as registry

_write = registry.write_bytes
_seen = []


def write_bytes(fs, path, data):
    _seen.append(path)
    if path.endswith({target!r}):
        os.kill(os.getpid(), signal.SIGKILL)
    _write(fs, path, data)


registry.write_bytes = write_bytes
"""


def _agree(store: ArtifactStore, mlflow_uri: str, said: str) -> str:
    """champion.json, latest.json, the history and MLflow's @champion agree, and with what the terminal said."""
    from mlflow import MlflowClient

    from synthtune.registry import derive

    registry = Registry(store, "demo")
    derived = derive(registry.history())["train_key"]
    stored = [json.loads(Path(p).read_text())["train_key"] for p in (registry.champion_path, registry.latest_path)]
    alias = MlflowClient(tracking_uri=mlflow_uri).get_model_version_by_alias("demo", "champion").tags
    assert stored == [derived, derived] and alias["synthtune.train_key"] == derived, (stored, derived, alias)
    [line] = [line for line in said.splitlines() if line.split()[:1] == ["promote"] and "running" not in line]
    assert derived in line, (derived, line)  # the promote line names what is in service
    return derived


@pytest.mark.integration
@pytest.mark.drill
def test_a_kill_at_every_registry_write_leaves_what_the_next_run_makes_consistent(copied, tmp_path, monkeypatch):
    from tests.support.faults import inject

    cfg, refs = copied
    mlflow = f"sqlite:///{tmp_path}/mlflow.db"
    root = f"artifact_root={cfg.artifact_root}"
    store = ArtifactStore(cfg.artifact_root)
    cli = [str(Path(sys.executable).parent / "synthtune")]
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (mlruns/) go here

    def run(*overrides: str, kill: str | None = None) -> subprocess.CompletedProcess:
        if kill:
            inject(monkeypatch, tmp_path / f"site-{kill}", KILL_AT.format(target=kill))
        else:
            monkeypatch.delenv("PYTHONPATH", raising=False)
        return subprocess.run([*cli, "run", str(DEMO), root, f"tracking.mlflow_uri={mlflow}", *overrides, "--engine",
                               "local"], capture_output=True, text=True, timeout=900, cwd=tmp_path)

    first = run()  # the copy's champion, mirrored in MLflow
    assert first.returncode == 0, first.stderr[-3000:]
    a = _agree(store, mlflow, first.stdout)
    candidates = {a: [], "b": ["train.seed=1", "train.epochs=10"]}  # two adapters: each kill flips the champion
    last: list[str] = []
    for n, target in enumerate(("history.jsonl", "champion.json", "latest.json")):
        champion = Registry(store, "demo").champion()["train_key"]
        other = next(overrides for key, overrides in candidates.items() if key != champion)
        tolerance = f"promote.min_delta_vs_champion={-1.0 + n / 10}"  # a new decision each time: it promotes
        last = [*other, tolerance]
        killed = run(*other, tolerance, kill=target)
        assert killed.returncode == -9, (target, killed.stdout[-2000:], killed.stderr[-2000:])
        after = run(*other, tolerance)
        assert after.returncode == 0, after.stderr[-3000:]
        now = _agree(store, mlflow, after.stdout)
        assert now != champion, f"the decision killed at {target} was not applied by the next run"
        candidates[now] = candidates.pop("b", other) if now not in candidates else candidates[now]
    for target in ("history.jsonl", "champion.json"):  # and a rollback killed at each of its writes
        before = Registry(store, "demo").champion()["train_key"]
        inject(monkeypatch, tmp_path / f"site-rollback-{target}", KILL_AT.format(target=target))
        killed = subprocess.run([*cli, "rollback", str(DEMO), root], capture_output=True, text=True, timeout=300)
        assert killed.returncode == -9, killed
        after = run(*last)  # the last night again: every stage reused, the verdict says what is in service
        assert after.returncode == 0, after.stderr[-3000:]
        now = _agree(store, mlflow, after.stdout)
        assert (now == before) == (target == "history.jsonl")  # applied once it is in the history
