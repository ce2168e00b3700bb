"""The artifact store and the one cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from synthtune.config import PipelineConfig
from synthtune.fields import content_kind
from synthtune.keys import stage_key
from synthtune.runner import DAG, plan
from synthtune.stages import train
from synthtune.store import ArtifactStore, produce

STEP_OF_SECTION = {"preflight": "preflight", "generate": "generate", "filter": "filter", "template": "template",
                   "train": "train", "evaluate": "evaluate[base]", "promote": "promote"}


def _mutations(model: BaseModel, tmp: Path, prefix: str = ""):
    """(dotted field path, changed value, affects_output) for every leaf field of a config."""
    for name, info in type(model).model_fields.items():
        value, path = getattr(model, name), f"{prefix}{name}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        affects = extra.get("affects_output", True)
        if isinstance(value, BaseModel):
            for sub in _mutations(value, tmp, f"{path}."):
                yield sub[0], sub[1], sub[2] and affects
            continue
        if content_kind(info.rebuild_annotation()) == "sources" and value:  # a seed folder: one more file in it
            new = tmp / path
            shutil.copytree(value, new)
            (new / "more.jsonl").write_text('{"id": "new", "prompt": "a new seed"}\n')
            yield path, str(new), affects
        elif value is None and content_kind(info.rebuild_annotation()) == "file":
            new = tmp / f"{path}.txt"
            new.write_text("{{ messages }}")
            yield path, new, affects
        elif isinstance(value, Path) and value.is_dir():
            new = tmp / path
            shutil.copytree(value, new)
            (new / "extra_task.yaml").write_text("task: extra_task\n")
            yield path, new, affects
        elif isinstance(value, Path):
            new = tmp / f"{path}.copy"
            new.write_text(value.read_text() + '{"id": "new", "prompt": "a new seed"}\n')
            yield path, new, affects
        elif isinstance(value, bool):
            yield path, not value, affects
        elif isinstance(value, int):
            yield path, value + 1, affects
        elif isinstance(value, float):
            yield path, value + 0.25 if value < 0.5 else value / 2, affects
        elif name in ("student", "teacher"):
            yield path, "tiny:teacher" if value == "tiny:student" else "tiny:student", affects
        elif get_origin(info.annotation) is Literal or any(get_origin(a) is Literal for a in get_args(info.annotation)):
            choices = [c for a in (info.annotation, *get_args(info.annotation)) if get_origin(a) is Literal
                       for c in get_args(a)]
            yield path, next(c for c in choices if c != value), affects
        elif isinstance(value, list):
            yield path, [*value, "extra_task"], affects
        elif isinstance(value, dict):
            yield path, {**value, "extra_variable": True}, affects
        elif value is None and int in get_args(info.annotation):
            yield path, 5, affects
        elif value is None and float in get_args(info.annotation):
            yield path, 0.5, affects
        elif value is None or isinstance(value, str):
            yield path, (value or "") + "changed", affects
        else:
            raise AssertionError(f"no mutation for {path}={value!r}: extend this test")


def _set(cfg: PipelineConfig, path: str, value) -> PipelineConfig:
    head, _, rest = path.partition(".")
    if not rest:
        return cfg.model_copy(update={head: value})
    return cfg.model_copy(update={head: _set(getattr(cfg, head), rest, value)})


def test_every_output_relevant_field_changes_its_stage_key(demo_cfg, tmp_path):
    base = plan(demo_cfg)
    seen = 0
    for path, value, affects in _mutations(demo_cfg, tmp_path):
        keys = plan(_set(demo_cfg, path, value))
        section = path.split(".")[0]
        if section in STEP_OF_SECTION:
            step = STEP_OF_SECTION[section]
            if path == "generate.rejected_model":  # read only in preference mode, keyed only there
                assert keys == base
                pref = _set(demo_cfg, "generate.mode", "preference")
                assert plan(_set(pref, path, "tiny:student"))["generate"] != plan(_set(pref, path, "tiny:teacher"))[
                    "generate"]
            elif path == "evaluate.allow_format_difference":  # preflight's format verdict only, no score changes
                assert {k for k in keys if keys[k] != base[k]} == {"preflight"}
            elif path in tuple(f"train.{f}" for f in train.LINEAGE_FIELDS):
                # no champion yet: every night starts from base, as a plain one (keys with one: test_lineage)
                assert keys["train"] == base["train"], path
            elif affects:
                assert keys[step] != base[step], f"changing {path} must change the {step} key"
                seen += 1
            else:
                assert keys == base, f"{path} is marked as not affecting output but changed a key"
        elif affects:  # shared fields (student): at least the stages that use them
            assert keys["train"] != base["train"] and keys["evaluate[base]"] != base["evaluate[base]"], path
            seen += 1
    assert seen >= 30


def test_one_field_reruns_only_its_stage_and_downstream(demo_cfg):
    base = plan(demo_cfg)
    changed = plan(_set(demo_cfg, "train.lora.r", 8))
    assert {s for s in base if base[s] != changed[s]} == {"train", "evaluate[tuned]", "promote"}


def test_key_hashes_file_contents_not_paths(demo_cfg, tmp_path):
    moved = tmp_path / "elsewhere" / "seeds"
    shutil.copytree(demo_cfg.generate.seeds, moved)
    cfg2 = _set(demo_cfg, "generate.seeds", str(moved))
    assert plan(cfg2)["generate"] == plan(demo_cfg)["generate"]
    seed_file = next(moved.iterdir())
    seed_file.write_text(seed_file.read_text().replace("Vardon", "Vardonia"))
    assert plan(cfg2)["generate"] != plan(demo_cfg)["generate"]


def test_stage_key_includes_stage_version_and_upstream():
    k = stage_key("train", "1", {"a": 1}, {"template": "x"})
    assert k != stage_key("train", "2", {"a": 1}, {"template": "x"})
    assert k != stage_key("train", "1", {"a": 1}, {"template": "y"})
    assert k != stage_key("filter", "1", {"a": 1}, {"template": "x"})
    assert k == stage_key("train", "1", {"a": 1}, {"template": "x"})


def test_manifest_written_last_and_crash_leaves_nothing_finished(tmp_path):
    store = ArtifactStore(str(tmp_path))

    def crash(staging):
        (staging.path / "data.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        produce(store, "train", "k1", {}, {}, crash)
    assert store.ref("train", "k1") is None

    calls = []

    def ok(staging):
        calls.append(1)
        (staging.path / "data.txt").write_text("whole")
        staging.rows["n"] = 1

    ref = produce(store, "train", "k1", {"template": "t"}, {"lr": 1}, ok)
    manifest = json.loads((tmp_path / "train" / "k1" / "manifest.json").read_text())
    assert manifest["files"]["data.txt"]["bytes"] == 5
    assert manifest["upstream"] == {"template": "t"} and manifest["rows"] == {"n": 1}
    assert {"versions", "git_sha", "run_id", "config", "created_at"} <= set(manifest)
    assert manifest["versions"]["torch"]
    # finished: skipped from its manifest, the body is not called again
    again = produce(store, "train", "k1", {}, {}, ok)
    assert again.reused and not ref.reused and again.model_copy(update={"reused": False}) == ref and calls == [1]
    assert manifest["digest"] == again.digest  # what downstream keys cover


def test_unfinished_folder_is_replaced_not_trusted(tmp_path):
    store = ArtifactStore(str(tmp_path))
    leftover = tmp_path / "filter" / "k" / "stale.parquet"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("from a crashed attempt")
    produce(store, "filter", "k", {}, {}, lambda st: (st.path / "data.parquet").write_text("new"))
    assert not leftover.exists()
    assert (tmp_path / "filter" / "k" / "data.parquet").read_text() == "new"


def test_store_on_another_fsspec_filesystem():
    """Any fsspec URL works as a root; memory:// stands in for an object store (no rename there)."""
    store = ArtifactStore("memory://synthtune-test")
    assert not store.local
    ref = produce(store, "generate", "k", {}, {}, lambda st: (st.path / "data.parquet").write_text("rows"))
    assert ref.uri.startswith("memory://") and ref.uri.endswith("/synthtune-test/generate/k")
    with store.local_copy(ref) as folder:
        assert (folder / "data.parquet").read_text() == "rows"


def test_dag_steps_are_named_after_their_stage():
    assert [s.name.split("[")[0] for s in DAG] == [s.stage.STAGE for s in DAG]


def _produce_slowly(root: str, n: int, start: float, log: str) -> None:
    """One of several runs (other machines, other Prefect homes) producing the same stage key."""
    import os
    import time

    from synthtune.store import ArtifactStore, produce

    def build(staging):
        with open(log, "a") as f:
            f.write(f"{n}\n")
        for i in range(3):  # a build that takes a while, writing as it goes
            (staging.path / f"part-{i}.txt").write_text(f"written by {n}\n" * 1000)
            time.sleep(0.3)

    time.sleep(max(0.0, start - time.time()))
    ref = produce(ArtifactStore(root), "train", "same-key", {}, {"n": 1}, build)
    with open(f"{log}.{os.getpid()}", "w") as f:
        f.write(ref.key)


def _producer_race(root: str, tmp_path: Path, n: int = 4) -> None:
    import multiprocessing as mp
    import time

    log = str(tmp_path / "builds.log")
    start = time.time() + 1.5
    procs = [mp.get_context("spawn").Process(target=_produce_slowly, args=(root, i, start, log)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(Path(log).read_text().split()) == 1, "more than one run built the same key"
    assert len(list(tmp_path.glob("builds.log.*"))) == n  # every run got the output
    store = ArtifactStore(root)
    assert store.problems("train", "same-key") == []  # its files match its manifest
    builder = Path(log).read_text().split()[0]
    with store.local_copy(store.ref("train", "same-key")) as folder:
        assert {p.read_text() for p in folder.glob("part-*.txt")} == {f"written by {builder}\n" * 1000}


def test_concurrent_producers_of_one_key_build_it_once_on_local_disk(tmp_path):
    _producer_race(str(tmp_path / "root"), tmp_path)


@pytest.mark.integration
def test_concurrent_producers_of_one_key_build_it_once_on_s3(s3_root, tmp_path):
    _producer_race(s3_root, tmp_path)
