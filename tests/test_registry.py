"""The registry on the artifact root: concurrent decisions, rollback, a corrupt champion, retention."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from synthtune.registry import Registry, RegistryError, champion_record
from synthtune.store import ArtifactStore, produce
from tests.support import DEMO


def _decide(root: str, n: int, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))  # everyone at once
    event = {"id": f"decision-{n}", "train_key": f"k{n}", "adapter": f"{root}/train/k{n}/adapter", "promoted": True,
             "scores": {"t": {"acc": n / 10}}}
    Registry(ArtifactStore(root)).decide(event, champion_record(event))


def _race(root: str, n: int = 8) -> Registry:
    start = time.time() + 1.5
    procs = [mp.get_context("spawn").Process(target=_decide, args=(root, i, start)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return Registry(ArtifactStore(root))


def _check_race(registry: Registry, n: int = 8) -> None:
    history = registry.history()  # every line parses
    assert sorted(e["id"] for e in history) == sorted(f"decision-{i}" for i in range(n))  # none lost
    champion = registry.champion()
    assert champion in [champion_record(e, promoted_at=champion["promoted_at"]) for e in history]  # exactly one of them
    assert registry.latest() == champion


def test_concurrent_decisions_on_local_disk(tmp_path):
    _check_race(_race(str(tmp_path / "root")))


@pytest.mark.integration
def test_concurrent_decisions_on_s3(s3_root):
    """The same race on an S3-compatible server (moto): the lock is an object created with If-None-Match."""
    import os

    assert os.environ["AWS_ENDPOINT_URL"]
    _check_race(_race(s3_root))


def _promoted(store, key: str, acc: float) -> dict:
    produce(store, "train", key, {}, {}, lambda st: (st.path / "adapter").mkdir() or
            (st.path / "adapter" / "adapter_config.json").write_text("{}"))
    event = {"id": f"p-{key}", "train_key": key, "adapter": store.uri("train", key, "adapter"), "promoted": True,
             "scores": {"demo_facts": {"acc": acc}}, "pipeline": "demo", "student": "tiny:student"}
    Registry(store).decide(event, champion_record(event))
    return event


def _cli(*args):
    return CliRunner().invoke(app, list(args))


def test_rollback_goes_back_one_promotion_then_refuses(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    root = f"artifact_root={demo_cfg.artifact_root}"
    result = _cli("rollback", str(DEMO), root)
    assert result.exit_code == 2 and "rollback: nothing to roll back to: no champion yet" in result.output
    _promoted(store, "night1", 0.6)
    _promoted(store, "night3", 0.9)
    result = _cli("rollback", str(DEMO), root)
    assert result.exit_code == 0, result.output
    assert "champion is now night1" in result.output and "was night3" in result.output
    registry = Registry(store)
    assert registry.champion()["train_key"] == "night1" and Registry(store).latest()["train_key"] == "night1"
    assert registry.history()[-1] == {**registry.history()[-1], "event": "rollback", "train_key": "night1",
                                      "from_train_key": "night3"}
    result = _cli("rollback", str(DEMO), root)
    assert result.exit_code == 2 and "nothing to roll back to: night1 is the first adapter ever promoted" in result.output
    result = _cli("rollback", str(DEMO), root, "--to", "nope")
    assert result.exit_code == 2 and "--to nope: no adapter with that train key was ever promoted (promoted: night1, " \
                                     "night3)" in " ".join(result.output.split())
    assert _cli("rollback", str(DEMO), root, "--to", "night3").exit_code == 0
    assert registry.champion()["train_key"] == "night3"

    shown = _cli("show", str(DEMO), root)
    assert shown.exit_code == 0 and "night3" in shown.output and "vllm serve tiny:student --enable-lora" in shown.output
    listed = _cli("models", str(DEMO), root)
    assert listed.exit_code == 0 and listed.output.count("rolled back from") == 2 and "night1" in listed.output


def test_a_corrupt_or_missing_champion_is_named_never_guessed(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    _promoted(store, "night1", 0.6)
    path = store.path("registry", "champion.json")
    with open(path, "w") as f:
        f.write('{"train_key": "night1", "adap')
    with pytest.raises(RegistryError, match=r"registry/champion.json is corrupt .* the gate will not guess"):
        Registry(store).champion()
    from synthtune.runner import plan

    with pytest.raises(RegistryError, match="champion.json is corrupt"):
        plan(demo_cfg)  # the run refuses before any stage, naming the file
    result = _cli("show", str(DEMO), f"artifact_root={demo_cfg.artifact_root}")
    assert result.exit_code == 2 and "champion.json is corrupt" in result.output
    with open(path, "w") as f:
        json.dump({"train_key": "night1"}, f)
    with pytest.raises(RegistryError, match="lacks adapter, scores, promoted_at"):
        Registry(store).champion()
    with open(store.path("registry", "history.jsonl"), "a") as f:
        f.write("{not json\n")
    with pytest.raises(RegistryError, match=r"history.jsonl:2: not JSON"):
        Registry(store).history()


def _output(store, stage, key, upstream=None, created="2026-01-01T00:00:00Z"):
    ref = produce(store, stage, key, upstream or {}, {}, lambda st: (st.path / "data.bin").write_bytes(b"x" * 1000))
    manifest = json.loads(open(f"{ref.uri}/manifest.json").read())
    manifest["created_at"] = created
    open(f"{ref.uri}/manifest.json", "w").write(json.dumps(manifest))
    return ref


def test_gc_keeps_the_champion_and_recent_promotions_and_deletes_the_rest(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    nights = {}
    for n in range(1, 5):  # four nights: data, adapter, evaluation, decision
        g = _output(store, "generate", f"g{n}")
        f = _output(store, "filter", f"f{n}", {"generate": g.key})
        t = _output(store, "template", f"t{n}", {"filter": f.key})
        _output(store, "train", f"tr{n}", {"template": t.key})
        _output(store, "evaluate", f"e{n}", {"train": f"tr{n}"})
        nights[n] = (g, f, t)
    _output(store, "evaluate", "base", {})
    registry = Registry(store)
    for n, promoted in ((1, True), (2, True), (3, False), (4, True)):
        event = {"id": str(n), "train_key": f"tr{n}", "adapter": store.uri("train", f"tr{n}", "adapter"),
                 "promoted": promoted, "scores": {}}
        registry.decide(event, champion_record(event) if promoted else None)
    _output(store, "train", "inflight", {"template": "t4"}, created="2999-01-01T00:00:00Z")  # a run still going
    (store.fs.makedirs(store.path("train", "unfinished"), exist_ok=True))
    root = f"artifact_root={demo_cfg.artifact_root}"

    dry = _cli("gc", str(DEMO), root, "--keep", "1", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert store.ref("train", "tr1") is not None  # a dry run deletes nothing
    assert _cli("gc", str(DEMO), root, "--keep", "1").exit_code == 0
    left = {f"{s}/{k}" for s in ("generate", "filter", "template", "train", "evaluate") for k in
            [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(s), detail=False)] if store.ref(s, k)}
    # champion tr4 with its data and evaluation; tr4 is also the newest promotion (keep 1); base; the run in flight
    assert left == {"generate/g4", "filter/f4", "template/t4", "train/tr4", "evaluate/e4", "evaluate/base",
                    "train/inflight"}
    assert store.fs.exists(store.path("train", "unfinished"))  # never touched: someone may be writing it
    assert len(registry.history()) == 4  # the history itself is never collected
