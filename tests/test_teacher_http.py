"""The HTTP teacher path against real OpenAI-compatible servers: `transformers serve` with the tiny
teacher on 127.0.0.1 through a fault-injecting hop (429, 500 and a hang are retried), and a
latency-controlled test server for the window: at most K requests in flight and K reached, 429 bursts
with Retry-After honoured, a request that always fails quarantined by name, a crash that loses at most
the unfinished window."""

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
    """... and the ledger counts what the server saw: every request sent (retries included), the answered
    ones, and the tokens the teacher reported; the next night, all cached, costs nothing and saves that."""
    from synthtune import ledger

    base, model = served_teacher
    monkeypatch.setenv("SYNTHTUNE_TEST_TEACHER_KEY", SECRET)
    hop = FaultyHop(f"{base}", [429, 500, "hang"])
    try:
        cfg = _cfg(demo_cfg, tmp_path, hop.url, model, concurrency=2)  # two batches in flight
        cfg = cfg.model_copy(update={"cost": cfg.cost.model_copy(update={
            "teacher_usd_per_m_prompt": 3.0, "teacher_usd_per_m_completion": 15.0})})
        ref = generate.run(cfg, ArtifactStore(cfg.artifact_root))
    finally:
        hop.close()
    night = ledger.night(cfg, {"generate": ref})
    calls = night["steps"][0]["calls"]["teacher"]
    assert calls["requests"] == hop.sent == 7 and calls["retries"] == 3  # 4 answers, 3 faults retried
    assert calls["requests"] - calls["retries"] == hop.posts == 4  # what reached transformers serve
    assert (calls["prompt_tokens"], calls["completion_tokens"]) == (hop.tokens["prompt"], hop.tokens["completion"])
    assert hop.tokens["prompt"] > 0 and hop.tokens["completion"] > 0 and calls["tokens"] == "api"
    assert night["usd"] == pytest.approx((hop.tokens["prompt"] * 3.0 + hop.tokens["completion"] * 15.0) / 1e6)
    again = generate.run(cfg, ArtifactStore(cfg.artifact_root))  # the hop is closed: a request would fail
    second = ledger.night(cfg, {"generate": again})
    assert again.reused and second["usd"] == 0.0 and second["requests"]["teacher"] == 0
    assert second["saved_usd"] == pytest.approx(night["usd"]) and second["steps"][0]["saved_requests"] == 7
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


def test_finished_answers_are_not_asked_again_after_the_teacher_went_down(demo_cfg, tmp_path, served_teacher):
    """Two requests go through; then the teacher answers 503 to everything: more than max_failed_share of
    the requests are given up, so the stage fails (nothing committed), keeping the two answers in the row
    cache; the retry asks only for the other two."""
    from synthtune.rowcache import RowCache

    base, model = served_teacher
    hop = FaultyHop(base, [None, None] + [503] * 40)
    cfg = _cfg(demo_cfg, tmp_path, hop.url, model, concurrency=1, max_retries=2)
    store = ArtifactStore(cfg.artifact_root)
    k = generate.key(cfg, {})
    try:
        with pytest.raises(GenerationError, match=r"the teacher gave up on 2 of 4 requests after retries \(more than "
                                                  r"generate.max_failed_share=0.05\); first: HTTP 503"):
            generate.run(cfg, store)
        assert store.ref("generate", k) is None and hop.posts == 2
        assert RowCache(f"{generate.cache_url(store)}/answers").size() == 2

        hop.faults.clear()  # the teacher is healthy again (same endpoint: same cache keys)
        hop.posts = 0
        ref = generate.run(cfg, store)
    finally:
        hop.close()
    assert hop.posts == 2  # only the unanswered requests were asked again
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    answers = {f["id"]: f["answer"] for f in demo_facts()}
    assert len(data) == 4 and {r.id: r.response for r in data.itertuples()} == {i: answers[i] for i in data["id"]}
    assert list(data["id"]) == [f["id"] for f in demo_facts()[:4]]  # seed order, whichever attempt made a row
    assert (ref.summary["rows"]["reused"], ref.summary["rows"]["generated"]) == (2, 2)


# ---------------------------------------------------------------- the window, against a latency-controlled server


@pytest.fixture(scope="module")
def latency():
    from tests.support.latency_server import latency_server

    with latency_server(0.2) as server:
        yield server


def _window_cfg(demo_cfg, tmp_path, server, n: int, **update):
    from tests.support.latency_server import MODEL

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"Question {i} about Vardon?"}) + "\n"
                             for i in range(n)))
    gen = demo_cfg.generate.model_copy(update={"teacher_kind": "openai", "teacher": MODEL, "base_url": server.url,
                                               "seeds": str(seeds), "timeout_s": 5.0, **update})
    return demo_cfg.model_copy(update={"generate": gen})


def test_the_window_keeps_k_requests_in_flight_and_never_more(demo_cfg, tmp_path, latency):
    latency.control(reset=True, latency=0.2)
    cfg = _window_cfg(demo_cfg, tmp_path, latency, 60, concurrency=8, batch_size=4)
    ref = generate.run(cfg, ArtifactStore(cfg.artifact_root))
    seen = latency.stats()
    assert seen["max_in_flight"] == 8 and seen["requests"] == 60 and not seen["asked_twice"]
    assert ref.summary["rows"]["output"] == 60 and ref.summary["rows"]["requests"] == 60
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    assert list(data["id"]) == [f"s{i}" for i in range(60)]  # rows in seed order, whatever order answers came in


def test_a_burst_of_429s_with_retry_after_is_honoured_and_every_row_arrives(demo_cfg, tmp_path, latency):
    latency.control(reset=True, latency=0.05, throttle=12, retry_after=1.0)
    cfg = _window_cfg(demo_cfg, tmp_path, latency, 30, concurrency=8)
    started = time.monotonic()
    ref = generate.run(cfg, ArtifactStore(cfg.artifact_root))
    seen = latency.stats()
    assert seen["throttled"] == 12 and ref.summary["rows"]["output"] == 30 and ref.summary["rows"]["retries"] >= 12
    assert time.monotonic() - started > 1.0  # nothing went out again before Retry-After said
    assert ref.summary["rows"]["failed"] == 0 and seen["requests"] == 30 + 12  # each throttled one asked once more


def test_a_request_that_always_fails_is_quarantined_by_name(demo_cfg, tmp_path, latency):
    latency.control(reset=True, latency=0.02, fail_marker="Question 7 ")
    cfg = _window_cfg(demo_cfg, tmp_path, latency, 40, concurrency=4, max_retries=2, max_failed_share=0.1)
    ref = generate.run(cfg, ArtifactStore(cfg.artifact_root))
    quarantined = pd.read_parquet(f"{ref.uri}/quarantine.parquet")
    [poison] = quarantined[quarantined["id"] == "s7"].itertuples()
    assert "gave up: HTTP 500" in poison.reason and "(after 3 attempts)" in poison.reason, poison.reason
    assert ref.summary["rows"]["output"] == 39 and ref.summary["rows"]["failed"] == 1
    assert latency.stats()["failed"] == 3  # asked three times, then given up; the window went on


def test_a_crash_loses_at_most_the_unfinished_window(demo_cfg, tmp_path, latency):
    import os
    import signal
    import subprocess
    import sys

    from synthtune.rowcache import RowCache

    latency.control(reset=True, latency=0.2)
    n, k, shard = 200, 8, 4
    cfg = _window_cfg(demo_cfg, tmp_path, latency, n, concurrency=k, batch_size=shard)
    store = ArtifactStore(cfg.artifact_root)
    script = ("from synthtune.config import PipelineConfig; from synthtune.stages import generate; "
              "from synthtune.store import ArtifactStore\n"
              f"cfg = PipelineConfig.model_validate_json({cfg.model_dump_json()!r})\n"
              "generate.run(cfg, ArtifactStore(cfg.artifact_root))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while latency.stats()["requests"] < n // 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stage, requests in flight
    proc.wait()
    asked = latency.stats()["requests"]
    cached = RowCache(f"{generate.cache_url(store)}/answers").size()
    latency.control(reset=True)
    ref = generate.run(cfg, store)  # the retry
    again = latency.stats()["requests"]
    assert again == n - cached and asked - cached <= k + shard  # lost: the window in flight and one shard at most
    assert (ref.summary["rows"]["reused"], ref.summary["rows"]["generated"]) == (cached, n - cached)


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
    assert any(log.message.startswith(("[distilabel.", "[synthtune.generate]")) for log in logs) and len(logs) > 10
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
