"""The HTTP teacher path against a real OpenAI-compatible server (`transformers serve` with the tiny
teacher on 127.0.0.1), through a fault-injecting hop: 429, 500 and a hang are retried."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from synthtune.stages import generate
from synthtune.stages.generate import GenerationError
from synthtune.store import ArtifactStore
from synthtune.tiny import demo_facts
from tests.support.servers import FaultyHop

pytestmark = pytest.mark.integration
SECRET = "sk-synthtune-test-9f8e7d6c5b4a"


def _cfg(demo_cfg, tmp_path, base_url, model, **update):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f["id"], "prompt": f["question"]}) + "\n" for f in demo_facts()[:4]))
    gen = demo_cfg.generate.model_copy(update={"teacher_kind": "openai", "teacher": model, "base_url": base_url,
                                               "seeds": str(seeds), "batch_size": 2, "timeout_s": 2.0,
                                               "api_key_env": "SYNTHTUNE_TEST_TEACHER_KEY", **update})
    return demo_cfg.model_copy(update={"generate": gen})


def test_http_teacher_with_retries_and_no_secret_anywhere(demo_cfg, tmp_path, served_teacher, monkeypatch, capfd):
    base, model = served_teacher
    monkeypatch.setenv("SYNTHTUNE_TEST_TEACHER_KEY", SECRET)
    hop = FaultyHop(f"{base}", [429, 500, "hang"])
    try:
        cfg = _cfg(demo_cfg, tmp_path, hop.url, model, concurrency=2)  # two batches in flight
        ref = generate.run(cfg, ArtifactStore(cfg.artifact_root))
    finally:
        hop.close()
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    answers = {f["id"]: f["answer"] for f in demo_facts()}
    assert {r.id: r.response for r in data.itertuples()} == {i: answers[i] for i in data["id"]} and len(data) == 4
    assert hop.seen[:1] == [200] and {429, 500, "hang"} <= set(hop.seen)  # every fault met, then retried
    assert all(a == f"Bearer {SECRET}" for a in hop.auth)  # the key was sent ...
    out, err = capfd.readouterr()
    leaked = [str(p) for p in Path(cfg.artifact_root).rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert SECRET not in out + err and not leaked  # ... and written nowhere


def test_teacher_that_stays_down_fails_naming_the_endpoint(demo_cfg, tmp_path, served_teacher):
    base, model = served_teacher
    hop = FaultyHop(base, [], always=503)
    try:
        cfg = _cfg(demo_cfg, tmp_path, hop.url, model, max_retries=2)
        with pytest.raises(GenerationError, match=rf"teacher endpoint {hop.url} is not answering after 3 tries; "
                                                  r"last error: HTTP 503"):
            generate.run(cfg, ArtifactStore(cfg.artifact_root))
    finally:
        hop.close()


def test_finished_batches_are_not_redone_after_a_failure(demo_cfg, tmp_path, served_teacher):
    """Batch 1 (2 seeds) goes through; batch 2 meets HTTP 400 (not retried): the stage fails naming
    the failed inputs, keeps batch 1 in the row cache, and the retry sends only batch 2's requests."""
    from synthtune.rowcache import RowCache

    base, model = served_teacher
    hop = FaultyHop(base, [None, None] + [400] * 10)
    cfg = _cfg(demo_cfg, tmp_path, hop.url, model)
    store = ArtifactStore(cfg.artifact_root)
    k = generate.key(cfg, {})
    try:
        with pytest.raises(Exception, match=r"the step raised for 2 of 4 inputs; the 2 finished are in the row cache"):
            generate.run(cfg, store)
        assert store.ref("generate", k) is None and hop.posts == 2
        assert RowCache(f"{generate.cache_url(store)}/answers").size() == 2

        hop.faults.clear()  # the teacher is healthy again (same endpoint: same cache keys)
        hop.posts = 0
        ref = generate.run(cfg, store)
    finally:
        hop.close()
    assert hop.posts == 2  # only the failed batch was asked again
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    answers = {f["id"]: f["answer"] for f in demo_facts()}
    assert len(data) == 4 and {r.id: r.response for r in data.itertuples()} == {i: answers[i] for i in data["id"]}
    assert list(data["id"]) == [f["id"] for f in demo_facts()[:4]]  # seed order, whichever attempt made a row
    assert (ref.summary["rows"]["reused"], ref.summary["rows"]["generated"]) == (2, 2)


@pytest.mark.flows
def test_key_from_a_prefect_secret_block_reaches_the_teacher_and_nothing_else(demo_cfg, tmp_path, served_teacher,
                                                                             monkeypatch, capfd, prefect_server):
    """The whole flow with the key in a Secret block (and no env var): the teacher gets it; the run's
    Prefect logs, artifacts, parameters, manifests, results and output do not contain it."""
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from flows.pipeline import pipeline

    base, model = served_teacher
    monkeypatch.delenv("SYNTHTUNE_TEST_TEACHER_KEY", raising=False)
    hop = FaultyHop(base, [])
    cfg = _cfg(demo_cfg, tmp_path, hop.url, model, api_key_secret="teacher-key")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2.0})})
    try:
        Secret(value=SECRET).save("teacher-key", overwrite=True)
        state = pipeline(cfg, return_state=True)
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            logs: list = []
            for _ in range(30):  # logs arrive in batches: read until they stop growing
                time.sleep(1)
                more = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
                if len(more) == len(logs):
                    break
                logs = more
            artifacts = client.read_artifacts()
            run = client.read_flow_run(run_id)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    finally:
        hop.close()
    assert state.is_completed(), state
    assert hop.auth and all(a == f"Bearer {SECRET}" for a in hop.auth)  # the key was sent, from the block
    assert any(log.message.startswith("[distilabel.") for log in logs) and len(logs) > 10
    out, err = capfd.readouterr()
    texts = [log.message for log in logs] + [str(a.data) + str(a.description) for a in artifacts]
    texts += [json.dumps(run.parameters, default=str), out, err]
    texts += [r.state.model_dump_json() for r in task_runs]  # what the server keeps of each task's result
    assert not [t for t in texts if SECRET in t]
    files = [p for p in Path(cfg.artifact_root).rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files)
    assert not any(".prefect-results" in str(p) for p in files)  # no task result is persisted: manifests are the cache
    assert not [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert '"api_key_secret": "teacher-key"' in json.dumps(run.parameters)  # only the block's name travels
