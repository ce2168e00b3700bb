"""Seed sources that grow: files, folders and globs on any fsspec URL; bad rows named by file and line
before any model loads; conflicting ids refused, identical ones counted."""

from __future__ import annotations

import json
import shutil

import pytest

from synthtune.config import ConfigError, load_config
from synthtune.seeds import SeedError, fingerprint, list_files, read_seeds
from tests.support import DEMO


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _seeds(tmp_path):
    root = tmp_path / "seeds"
    _jsonl(root / "2026-12-01.jsonl", [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": "second"}])
    _jsonl(root / "2026-12-02.jsonl", [{"id": "c", "prompt": "third"}])
    _jsonl(root / "later" / "x.jsonl", [{"id": "d", "prompt": "fourth"}])
    (root / "notes.txt").write_text("not a seed file")
    return root


def test_a_folder_reads_every_file_in_sorted_order_and_rows_remember_file_and_line(tmp_path):
    got = read_seeds(str(_seeds(tmp_path)))
    assert [(r["id"], r["seed_file"], r["seed_line"]) for r in got.rows] == [
        ("a", "2026-12-01.jsonl", 1), ("b", "2026-12-01.jsonl", 2), ("c", "2026-12-02.jsonl", 1),
        ("d", "later/x.jsonl", 1)]
    assert got.files == ["2026-12-01.jsonl", "2026-12-02.jsonl", "later/x.jsonl"]


def test_a_glob_picks_its_files(tmp_path):
    root = _seeds(tmp_path)
    assert [f.name for f in list_files(f"{root}/2026-*.jsonl")] == ["2026-12-01.jsonl", "2026-12-02.jsonl"]
    assert [r["id"] for r in read_seeds(f"{root}/*/x.jsonl").rows] == ["d"]


def test_the_key_covers_every_file_and_not_where_the_folder_is(tmp_path):
    root = _seeds(tmp_path)
    before = fingerprint(str(root))
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert fingerprint(str(moved)) == before
    _jsonl(moved / "2026-12-03.jsonl", [{"id": "e", "prompt": "fifth"}])  # a new night's file
    assert fingerprint(str(moved)) != before
    shutil.rmtree(moved)
    shutil.copytree(root, moved)
    (moved / "later" / "x.jsonl").write_text('{"id": "d", "prompt": "fourth, edited"}\n')  # an edit deep inside
    assert fingerprint(str(moved)) != before


def test_the_same_id_with_another_prompt_is_an_error_naming_both_places(tmp_path):
    root = _seeds(tmp_path)
    _jsonl(root / "2026-12-03.jsonl", [{"id": "x", "prompt": "new"}, {"id": "b", "prompt": "not the second"}])
    with pytest.raises(SeedError, match=r"id 'b' at 2026-12-03.jsonl:2 has a different prompt than at "
                                        r"2026-12-01.jsonl:2"):
        read_seeds(str(root))


def test_the_same_id_twice_in_one_file_with_other_prompts_is_never_mispaired(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"id": "q", "prompt": "What is the capital of Vardon?"},
                                         {"id": "q", "prompt": "bananas?"}])
    with pytest.raises(SeedError, match=r"id 'q' at s.jsonl:2 has a different prompt than at s.jsonl:1"):
        read_seeds(str(path))


def test_identical_duplicates_are_dropped_and_counted(tmp_path):
    root = _seeds(tmp_path)
    _jsonl(root / "2026-12-03.jsonl", [{"id": "a", "prompt": "first"}, {"id": "e", "prompt": "fifth"}])
    got = read_seeds(str(root))
    assert [r["id"] for r in got.rows] == ["a", "b", "c", "e", "d"] and got.duplicates == 1


def test_bad_rows_are_quarantined_with_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "bom", "prompt": "row one after a BOM"}\n'
                     b'{"id": "latin", "prompt": "caf\xe9"}\n'
                     b'{"id": null, "prompt": "null id"}\n'
                     b'{"id": {"a": 1}, "prompt": "dict id"}\n'
                     b'[1, 2]\n'
                     b'{"id": 7, "prompt": "whole numbers are ids"}\n'
                     b'{"id": "cut", "prompt": "unfinished\n')
    got = read_seeds(str(path))
    assert [(r["id"], r["seed_line"]) for r in got.rows] == [("bom", 1), ("7", 6)]
    reasons = {q["line"]: q["reason"] for q in got.quarantined}
    assert reasons[2] == "not UTF-8 (byte 0xe9 at column 31)"
    assert reasons[3] == "field 'id' is null, not text or a whole number"
    assert reasons[4] == "field 'id' is dict, not text or a whole number"
    assert reasons[5] == "not a JSON object"
    assert reasons[7].startswith("not JSON")
    assert all(q["file"] == "s.jsonl" for q in got.quarantined)


def test_a_glob_matching_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"generate.seeds: .*nothing-\*.jsonl' matches no seed file"):
        load_config(DEMO, [f"generate.seeds={tmp_path}/nothing-*.jsonl"])


def test_sources_on_an_object_store(tmp_path):
    """memory:// stands in for s3:// (same fsspec calls: glob, find, open, info)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/seeds/date=2026-12-01/part-0.jsonl", b'{"id": "a", "prompt": "first"}\n')
    fs.pipe("/bucket/seeds/date=2026-12-02/part-0.jsonl", b'{"id": "b", "prompt": "second"}\n')
    got = read_seeds("memory://bucket/seeds/date=*/part-*.jsonl")
    assert [(r["id"], r["seed_file"]) for r in got.rows] == [("a", "date=2026-12-01/part-0.jsonl"),
                                                              ("b", "date=2026-12-02/part-0.jsonl")]
    before = fingerprint("memory://bucket/seeds/")
    fs.pipe("/bucket/seeds/date=2026-12-02/part-0.jsonl", b'{"id": "b", "prompt": "edited"}\n')
    assert fingerprint("memory://bucket/seeds/") != before
    with pytest.raises(SeedError, match="matches no seed file"):
        list_files("memory://bucket/seeds/date=2027-*/part-*.jsonl")
    # a URL is taken as it is by the config (listed at run time, before any model loads)
    cfg = load_config(DEMO, ["generate.seeds=memory://bucket/seeds/"])
    assert cfg.generate.seeds == "memory://bucket/seeds/"


def test_bad_seeds_fail_before_any_model_loads(demo_cfg, tmp_path, monkeypatch):
    from synthtune import child
    from synthtune.stages import generate
    from synthtune.store import ArtifactStore

    def no_child(*args, **kwargs):
        raise AssertionError("the teacher was started")

    monkeypatch.setattr(child, "call_in_child", no_child)
    root = _seeds(tmp_path)
    _jsonl(root / "2026-12-03.jsonl", [{"id": "a", "prompt": "not the first"}])
    cfg = demo_cfg.model_copy(update={"generate": demo_cfg.generate.model_copy(update={"seeds": str(root)})})
    with pytest.raises(SeedError, match="id 'a' at 2026-12-03.jsonl:1"):
        generate.run(cfg, ArtifactStore(cfg.artifact_root))
