"""generate.engine=ray: teacher replicas as Ray actors on a local Ray cluster started for the run, the
seeds split between them with nothing asked twice; the rows and the row cache behave as locally."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from synthtune.stages import generate
from synthtune.store import ArtifactStore
from tests.support import ray_processes

pytestmark = pytest.mark.integration


def test_ray_gives_the_local_engines_rows_and_shares_its_row_cache(demo_run, tmp_path):
    cfg, refs = demo_run
    assert not ray_processes()
    on_ray = cfg.generate.model_copy(update={"engine": "ray", "replicas": 2})  # two teacher actors
    store = ArtifactStore(str(tmp_path / "root"))
    ref = generate.run(cfg.model_copy(update={"generate": on_ray, "artifact_root": store.root_url}), store)
    assert ref.key == refs["generate"].key  # where it ran is not what it made
    local = pd.read_parquet(f"{refs['generate'].uri}/data.parquet")
    ray = pd.read_parquet(f"{ref.uri}/data.parquet")
    assert ray.to_dict("records") == local.to_dict("records")
    assert (ref.summary["rows"]["generated"], ref.summary["rows"]["reused"]) == (35, 0)
    assert store.manifest("generate", ref.key)["replica_requests"] == [18, 17]  # split, each asked once
    assert not ray_processes(), "the local Ray cluster outlived the run"

    # the next night on Ray: one new seed file; only its row goes to the teacher
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for f in sorted(__import__("pathlib").Path(cfg.generate.seeds).glob("*.jsonl")):
        (seeds / f.name).write_text(f.read_text())
    (seeds / "2026-12-03.jsonl").write_text(json.dumps({"id": "new-1", "prompt": "What is the capital of Norrland?"})
                                            + "\n")
    nightly = on_ray.model_copy(update={"seeds": str(seeds)})
    ref2 = generate.run(cfg.model_copy(update={"generate": nightly, "artifact_root": store.root_url}), store)
    assert (ref2.summary["rows"]["reused"], ref2.summary["rows"]["generated"], ref2.summary["rows"]["new"]) == (35, 1, 1)


def test_two_replicas_of_an_http_teacher_split_the_seeds_and_ask_nothing_twice(demo_cfg, tmp_path):
    from tests.support.latency_server import MODEL, latency_server

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(40)))
    with latency_server(0.1) as server:
        gen = demo_cfg.generate.model_copy(update={"engine": "ray", "replicas": 2, "concurrency": 4, "teacher": MODEL,
                                                   "teacher_kind": "openai", "base_url": server.url, "seeds": str(seeds)})
        cfg = demo_cfg.model_copy(update={"generate": gen})
        store = ArtifactStore(cfg.artifact_root)
        ref = generate.run(cfg, store)
        seen = server.stats()
    assert seen["requests"] == 40 and not seen["asked_twice"] and ref.summary["rows"]["output"] == 40
    assert store.manifest("generate", ref.key)["replica_requests"] == [20, 20]
    assert seen["max_in_flight"] <= 2 * 4  # replicas x concurrency
    assert not ray_processes(), "the local Ray cluster outlived the run"
