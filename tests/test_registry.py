"""The registry on the artifact root, one per pipeline: concurrent decisions, the champion derived from the
history, rollback, what a crash between writes leaves, gc, and a root from before registries were per
pipeline. Each numbered finding of the model-in-service review has its regression test here (or in
tests/test_pipelines.py end to end)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtune import atomic, runs
from synthtune.cli import app
from synthtune.registry import Registry, RegistryError, derive
from synthtune.retention import collect
from synthtune.store import ArtifactStore, produce
from tests.support import DEMO, ROOT


def _decide(root: str, n: int, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))  # everyone at once
    Registry(ArtifactStore(root), "demo").decide({"id": f"decision-{n}", "train_key": f"k{n}", "promoted": True,
                                                  "scores": {"t": {"acc": n / 10}}})


def _race(root: str, n: int = 8) -> Registry:
    start = time.time() + 1.5
    procs = [mp.get_context("spawn").Process(target=_decide, args=(root, i, start)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return Registry(ArtifactStore(root), "demo")


def _check_race(registry: Registry, n: int = 8) -> None:
    history = registry.history()  # every line parses
    assert sorted(e["id"] for e in history) == sorted(f"decision-{i}" for i in range(n))  # none lost
    champion = registry.champion()
    assert champion["train_key"] == history[-1]["train_key"]  # the last decision recorded is in service
    assert registry.latest() == champion == json.loads(registry.fs.cat_file(registry.champion_path))


def test_concurrent_decisions_on_local_disk(tmp_path):
    _check_race(_race(str(tmp_path / "root")))


@pytest.mark.integration
def test_concurrent_decisions_on_s3(s3_root):
    """The same race on an S3-compatible server (moto): the lock is an object created with If-None-Match."""
    assert os.environ["AWS_ENDPOINT_URL"]
    _check_race(_race(s3_root))


def _adapter(store: ArtifactStore, key: str) -> None:
    produce(store, "train", key, {}, {}, lambda st: (st.path / "adapter").mkdir() or
            (st.path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of " + key.encode()))


def _promote(store: ArtifactStore, key: str, acc: float, pipeline: str = "demo", promoted: bool = True) -> dict:
    _adapter(store, key)
    event = {"id": f"{pipeline}-{key}-{acc}", "train_key": key, "promoted": promoted, "student": "tiny:student",
             "scores": {"demo_facts": {"acc": acc}}}
    Registry(store, pipeline).decide(event)
    return event


def _cli(*args, root=None):
    return CliRunner().invoke(app, [*args[:2], *([f"artifact_root={root}"] if root else []), *args[2:]])


def test_rollback_goes_back_one_promotion_then_refuses(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    root = demo_cfg.artifact_root
    result = _cli("rollback", str(DEMO), root=root)
    assert result.exit_code == 2 and "rollback: nothing to roll back to: no champion yet" in result.output
    _promote(store, "night1", 0.6)
    _promote(store, "night3", 0.9)
    result = _cli("rollback", str(DEMO), root=root)
    assert result.exit_code == 0, result.output
    assert "champion of 'demo' is now night1" in result.output and "was night3" in result.output
    registry = Registry(store, "demo")
    assert registry.champion()["train_key"] == "night1" and registry.latest()["train_key"] == "night1"
    assert registry.history()[-1] == {**registry.history()[-1], "event": "rollback", "train_key": "night1",
                                      "from_train_key": "night3"}
    result = _cli("rollback", str(DEMO), root=root)
    assert result.exit_code == 2 and "nothing to roll back to: night1 is the first adapter ever promoted" in result.output
    result = _cli("rollback", str(DEMO), "--to", "nope", root=root)
    assert result.exit_code == 2 and "--to nope: pipeline 'demo' never promoted an adapter with that train key " \
                                     "(promoted: night1, night3)" in " ".join(result.output.split())
    assert _cli("rollback", str(DEMO), "--to", "night3", root=root).exit_code == 0
    assert registry.champion()["train_key"] == "night3"

    shown = _cli("show", str(DEMO), root=root)
    assert shown.exit_code == 0 and "night3" in shown.output and "vllm serve tiny:student --enable-lora" in shown.output
    listed = _cli("models", str(DEMO), root=root)
    assert listed.exit_code == 0 and listed.output.count("rolled back from") == 2 and "night1" in listed.output


def test_1_pipelines_sharing_a_root_never_share_a_champion(tmp_path):
    """Finding 1: a second pipeline's adapter replaced the demo's champion, `show` printed it, gc listed it."""
    root = tmp_path / "root"
    store = ArtifactStore(str(root))
    _promote(store, "demo-adapter", 0.9, "demo")
    _promote(store, "bot-adapter", 0.5, "support-bot")  # gated against base only: its own first champion
    assert Registry(store, "demo").champion()["train_key"] == "demo-adapter"
    assert Registry(store, "support-bot").champion()["train_key"] == "bot-adapter"
    shown = _cli("show", str(DEMO), root=root)
    assert shown.exit_code == 0 and "demo-adapter" in shown.output and "bot-adapter" not in shown.output
    dry = _cli("gc", str(DEMO), "--keep", "0", "--dry-run", root=root)
    assert dry.exit_code == 0 and "bot-adapter" not in dry.output
    listed = _cli("models", "--root", str(root))
    assert listed.exit_code == 0 and {"demo", "support-bot", "demo-adapter", "bot-adapter"} <= set(listed.output.split())


def test_1_init_puts_a_new_project_s_artifacts_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # where the demo's own root is
    folder = tmp_path / "support-bot"
    assert _cli("init", str(folder)).exit_code == 0
    from synthtune.config import load_config

    cfg = load_config(folder / "pipeline.yaml")
    assert cfg.name == "support-bot" and Path(cfg.artifact_root) == folder / "artifacts"
    text = (folder / "pipeline.yaml").read_text()
    assert text.startswith("# support-bot: a synthtune pipeline") and "this file is the default" not in text


def test_1_a_second_config_with_the_same_name_is_warned_about_naming_both(tmp_path):
    from synthtune.cli.registry import same_name_warning
    from synthtune.config import load_config

    root = tmp_path / "root"
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for path in (first, second):
        shutil.copy(DEMO, path)
        text = path.read_text().replace("seeds: data/seeds/", f"seeds: {ROOT}/configs/data/seeds/")
        path.write_text(text.replace("task_dir: eval_tasks", f"task_dir: {ROOT}/configs/eval_tasks"))
    cfg = load_config(first, [f"artifact_root={root}"])
    assert same_name_warning(first, [f"artifact_root={root}"], cfg) is None
    assert same_name_warning(first, [f"artifact_root={root}"], cfg) is None  # the same file again: fine
    warning = same_name_warning(second, [f"artifact_root={root}"], load_config(second, [f"artifact_root={root}"]))
    assert warning and str(first) in warning and str(second) in warning and "share one registry" in warning


def test_3_13_a_missing_or_corrupt_champion_file_is_rebuilt_from_the_history(demo_cfg, caplog):
    """Finding 3: a removed champion.json read as the first night; 13: a corrupt one found after model time."""
    store = ArtifactStore(demo_cfg.artifact_root)
    _promote(store, "night1", 0.6)
    _promote(store, "night2", 0.969)
    registry = Registry(store, "demo")
    os.remove(registry.champion_path)
    errors, warnings = registry.problems()
    assert not errors and any("champion.json is missing" in w and "night2" in w for w in warnings)
    checked = _cli("validate", str(DEMO), root=demo_cfg.artifact_root)
    assert checked.exit_code == 0 and "champion.json is missing" in " ".join(checked.output.split())
    with caplog.at_level(logging.WARNING, logger="synthtune.registry"):
        assert registry.champion()["train_key"] == "night2"  # never "no champion yet"
    assert "rebuilt from the history" in caplog.text and json.loads(Path(registry.champion_path).read_text())[
        "train_key"] == "night2"
    from synthtune.runner import plan

    assert "evaluate[champion]" in plan(demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(
        update={"seed": 5})}))  # the gate compares with the champion, not with base only

    Path(registry.champion_path).write_text('{"train_key": "night1", "adap')  # corrupt
    result = _cli("rollback", str(DEMO), "--to", "night1", root=demo_cfg.artifact_root)  # the advised fix works
    assert result.exit_code == 0, result.output
    assert registry.champion()["train_key"] == "night1"


def test_13_a_torn_history_line_is_named_before_any_model_time(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    _promote(store, "night1", 0.6)
    registry = Registry(store, "demo")
    with open(registry.history_path, "a") as f:
        f.write('{"event": "decision", "train_key": "nig')  # a torn last line
    with pytest.raises(RegistryError, match=r"history.jsonl:2: not JSON"):
        registry.champion()
    checked = _cli("validate", str(DEMO), root=demo_cfg.artifact_root)
    assert checked.exit_code == 2 and "history.jsonl:2: not JSON" in " ".join(checked.output.split())
    from synthtune.runner import run_all

    with pytest.raises(RegistryError, match="history.jsonl:2"):
        run_all(demo_cfg)
    assert not (Path(demo_cfg.artifact_root) / "generate").exists()  # before any stage


def test_13_an_empty_eval_data_file_fails_validate_naming_it(tmp_path):
    tasks = tmp_path / "eval_tasks"
    shutil.copytree(ROOT / "configs" / "eval_tasks", tasks)
    (tasks / "demo_facts.jsonl").write_text("")
    checked = _cli("validate", str(DEMO), f"evaluate.task_dir={tasks}", root=tmp_path / "root")
    assert checked.exit_code == 2 and "demo_facts.jsonl has no items" in " ".join(checked.output.split())


def test_4_a_decision_recorded_but_not_applied_is_applied_on_retry(tmp_path, monkeypatch):
    """Finding 4: a crash between the history append and the champion.json write left the old champion
    in service for good, while the retry printed PROMOTED."""
    store = ArtifactStore(str(tmp_path / "root"))
    _promote(store, "old", 0.5)
    registry = Registry(store, "demo")
    write = atomic.write_bytes

    def crash_on_champion(fs, path, data):
        if path.endswith("champion.json"):
            raise KeyboardInterrupt("killed between the writes")
        write(fs, path, data)

    monkeypatch.setattr("synthtune.registry.write_bytes", crash_on_champion)
    _adapter(store, "new")
    event = {"id": "decision-new", "train_key": "new", "promoted": True, "scores": {}}
    with pytest.raises(KeyboardInterrupt):
        registry.decide(event)
    monkeypatch.setattr("synthtune.registry.write_bytes", write)
    assert json.loads(Path(registry.champion_path).read_text())["train_key"] == "old"  # stale on disk...
    recorded, before, after = registry.decide(event)  # ... the retry of the same decision
    assert not recorded and before["train_key"] == "old" and after["train_key"] == "new"
    assert [e["id"] for e in registry.history()].count("decision-new") == 1
    assert json.loads(Path(registry.champion_path).read_text())["train_key"] == "new" == registry.latest()["train_key"]


def test_5_rollback_and_show_refuse_a_damaged_adapter(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    _promote(store, "night1", 0.6)
    _promote(store, "night2", 0.7)
    os.remove(store.path("train", "night1", "adapter", "adapter_model.safetensors"))  # an interrupted gc
    result = _cli("rollback", str(DEMO), root=demo_cfg.artifact_root)
    assert result.exit_code == 2 and "cannot roll back to night1: its output is not intact" in " ".join(
        result.output.split())
    assert Registry(store, "demo").champion()["train_key"] == "night2"  # nothing changed
    os.remove(store.path("train", "night2", "manifest.json"))
    shown = _cli("show", str(DEMO), root=demo_cfg.artifact_root)
    assert shown.exit_code == 1 and "is damaged" in shown.output and "vllm serve" not in shown.output


def test_6_gc_and_rollback_take_turns_on_the_registry_lock(tmp_path):
    """Finding 6: gc deleted the adapter a concurrent rollback had just made champion."""
    store = ArtifactStore(str(tmp_path / "root"))
    for key, acc in (("n1", 0.5), ("n2", 0.6), ("n3", 0.7)):
        _promote(store, key, acc)
    paused, done = threading.Event(), {}

    def pause(plan):
        paused.set()
        time.sleep(3)  # gc has planned, holds the lock; a rollback to n1 arrives now

    gc = threading.Thread(target=lambda: done.setdefault("gc", collect(store, "demo", keep=0, on_planned=pause)))
    gc.start()
    paused.wait(10)
    with pytest.raises(RegistryError, match="cannot roll back to n1: its output is not intact"):
        Registry(store, "demo").rollback(to="n1")  # waited for gc, which deleted n1 (outside keep 0)
    gc.join()
    champion = Registry(store, "demo").champion()
    assert champion["train_key"] == "n3" and store.problems("train", "n3") == []
    assert "train/n1" in done["gc"].deleted

    _promote(store, "n4", 0.8)
    Registry(store, "demo").rollback(to="n3")  # the other order: a rollback first, then gc keeps what it restored
    collect(store, "demo", keep=0)
    assert Registry(store, "demo").champion()["train_key"] == "n3" and store.problems("train", "n3") == []


def test_7_a_moved_root_resolves_adapters_where_it_is_now(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _promote(ArtifactStore(str(old)), "night1", 0.6)
    shutil.copytree(old, new)
    shutil.rmtree(old)
    registry = Registry(ArtifactStore(str(new)), "demo")
    record = registry.champion()
    assert record["adapter"] == "train/night1/adapter"  # relative to the root in every registry file
    assert registry.adapter_uri(record) == str(new / "train" / "night1" / "adapter")
    shown = _cli("show", str(DEMO), root=new)
    assert shown.exit_code == 0 and f"demo={new}/train/night1/adapter" in " ".join(shown.output.split())
    assert str(old) not in Path(registry.champion_path).read_text() + Path(registry.history_path).read_text()


def _output(store, stage, key, upstream=None):
    return produce(store, stage, key, upstream or {}, {}, lambda st: (st.path / "data.bin").write_bytes(b"x" * 1000))


def test_8_gc_keeps_what_a_run_in_flight_uses(tmp_path):
    """Finding 8: a rollback, then `gc --keep 0` while a run trained, deleted that run's filter output."""
    store = ArtifactStore(str(tmp_path / "root"))
    _promote(store, "n1", 0.5)
    _promote(store, "n2", 0.6)
    Registry(store, "demo").rollback()  # a registry event newer than the run's data
    _output(store, "generate", "g-live")
    _output(store, "filter", "f-live", {"generate": "g-live"})
    _output(store, "filter", "f-dead", {"generate": "g-live"})
    with runs.leased(store, "demo", "run-1") as lease:
        lease.use("generate", "g-live")
        lease.use("filter", "f-live")
        plan = collect(store, "demo", keep=0)
    assert store.ref("filter", "f-live") and store.ref("generate", "g-live")
    assert "filter/f-dead" in plan.deleted and "in use by run run-1" in plan.keep["filter/f-live"]


def test_9_gc_keeps_the_checkpoints_of_a_night_never_decided(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    _promote(store, "n1", 0.5)
    for key in ("interrupted", "n1"):
        (Path(store.path("train", ".work", key, "checkpoints", "checkpoint-20"))).mkdir(parents=True)
    plan = collect(store, "demo", keep=0)
    assert (Path(store.root) / "train/.work/interrupted").is_dir()  # Ctrl-C said the same command resumes from it
    assert "never decided" in plan.keep["train/.work/interrupted"]
    assert "train/.work/n1" in plan.deleted  # decided: its adapter is committed


def test_10_gc_leaves_prefect_result_records_alone(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    _promote(store, "n1", 0.5)
    _output(store, "generate", "old")
    results = Path(store.root) / ".prefect-results"
    results.mkdir()
    (results / "generate-old").write_text("{}")  # what an earlier version persisted per task
    result = _cli("gc", str(DEMO), "--keep", "0", root=store.root)
    assert result.exit_code == 0, result.output
    assert store.ref("generate", "old") is None and (results / "generate-old").is_file()


def test_12_reports_say_what_the_decision_did(demo_cfg):
    """Finding 12: a cached verdict after a rollback printed PROMOTED; a candidate that was the champion was
    said to have no champion; a rollback after a re-promotion called an adapter the first ever promoted."""
    from synthtune.stages import promote
    from tests.test_promote import BASE, TUNED, _samples, _train

    store = ArtifactStore(demo_cfg.artifact_root)

    def night(tuned_key: str, train_key: str, champion: str | None = None, right=(1, 1, 1, 0)) -> dict:
        refs = {"base": _samples(store, "b", [1, 0, 0, 1], BASE), "tuned": _samples(store, tuned_key, list(right), TUNED),
                "train": _train(store, train_key)}
        if champion:  # a weaker champion: the candidate beats it
            refs["champion"] = _samples(store, f"c-{champion}", [1, 0, 0, 0], {"demo_facts": {"acc": 0.5}},
                                        adapter_key=champion)
        return refs

    first = promote.run(demo_cfg, store, night("t1", "tr1"))
    assert first.summary["outcome"] == "PROMOTED: tr1 is the first champion"
    second = promote.run(demo_cfg, store, night("t2", "tr2", champion="tr1"))
    assert second.summary["outcome"] == "PROMOTED: tr2 replaces tr1"
    Registry(store, "demo").rollback()
    again = promote.run(demo_cfg, store, night("t2", "tr2", champion="tr1"))
    assert again.reused and again.summary["outcome"] == "unchanged: tr1 is still the champion"
    same = promote.run(demo_cfg, store, night("t1b", "tr1", right=(1, 1, 0, 1)))  # the candidate is the champion
    assert same.summary["reasons"][0] == "tr1 is already the champion: nothing else to compare with, the gate is vs " \
                                         "base only"
    assert same.summary["outcome"] == "tr1 is already the champion: it stays in service"
    repromoted = promote.run(demo_cfg, store, night("t2b", "tr2", champion="tr1", right=(0, 1, 1, 1)))
    assert repromoted.summary["outcome"].startswith("PROMOTED again: tr2 replaces tr1 (it was the champion before")
    Registry(store, "demo").rollback()  # back to tr1 ...
    with pytest.raises(RegistryError) as e:
        Registry(store, "demo").rollback()  # ... and there is nothing before tr1
    assert "tr1 is the first adapter ever promoted" in str(e.value)


def test_flat_registry_of_a_root_from_before_is_migrated_per_pipeline(tmp_path, caplog):
    """A root made by the code before registries were per pipeline (tests/data/flat-root: the demo and a
    support-bot pipeline, written into one flat registry) is migrated on first use."""
    root = tmp_path / "root"
    shutil.copytree(ROOT / "tests" / "data" / "flat-root", root)
    flat = [json.loads(line) for line in (root / "registry" / "history.jsonl").read_text().splitlines()]
    store = ArtifactStore(str(root))
    with caplog.at_level(logging.WARNING, logger="synthtune.registry"):
        demo = Registry(store, "demo")
    assert "migrated the flat registry" in caplog.text
    assert not (root / "registry" / "history.jsonl").exists() and (root / "registry" / ".flat" / "history.jsonl").exists()
    for name in {e["pipeline"] for e in flat}:
        mine = [e for e in flat if e["pipeline"] == name]
        registry = Registry(store, name)
        assert [e["id"] for e in registry.history()] == [e["id"] for e in mine]
        assert registry.champion()["train_key"] == derive(mine)["train_key"]
        assert registry.champion()["adapter"] == f"train/{registry.champion()['train_key']}/adapter"
    assert demo.champion()["train_key"] != Registry(store, "support-bot").champion()["train_key"]


def test_a_decision_or_rollback_applied_as_recorded_logs_no_repair(demo_cfg, caplog):
    """champion.json following a decision just recorded is the normal path: no 'rebuilt' warning."""
    store = ArtifactStore(demo_cfg.artifact_root)
    with caplog.at_level(logging.WARNING, logger="synthtune.registry"):
        _promote(store, "night1", 0.6)
        _promote(store, "night2", 0.9)
        Registry(store, "demo").rollback(to="night1")
    assert "rebuilt" not in caplog.text and Registry(store, "demo").champion()["train_key"] == "night1"
