"""The Prefect flow on a real (temporary) Prefect server: caching and partial reruns by task state."""

from __future__ import annotations

import json

import pytest

from tests.support.flows import artifacts_of
from tests.support.flows import task_states as _task_states

pytestmark = pytest.mark.flows


def _run(cfg, expect: str | None = "Completed"):
    """Run the flow; `expect` is the final state's name (None: any completed state)."""
    from flows.pipeline import pipeline

    state = pipeline(cfg, return_state=True)
    assert state.is_completed() and state.name == (expect or state.name), state
    return state.state_details.flow_run_id, state.result()


def test_rerun_is_cached_and_one_field_reruns_only_downstream(prefect_server, demo_cfg):
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    import flows.pipeline  # noqa: F401  (importing Prefect's flow machinery sets up its logging first)

    root_handlers = list(logging.getLogger().handlers)
    first_id, refs = _run(demo_cfg)
    assert logging.getLogger().handlers == root_handlers  # distilabel did not take over logging here
    first = _task_states(first_id)
    assert set(first) == {"preflight", "generate", "filter", "template", "train", "evaluate[base]",
                          "evaluate[tuned]", "promote"}
    assert set(first.values()) == {"Completed"}
    assert refs["evaluate[tuned]"].summary["scores"]["demo_facts"]["acc"] > \
        refs["evaluate[base]"].summary["scores"]["demo_facts"]["acc"]

    second_id, again = _run(demo_cfg)
    assert set(_task_states(second_id).values()) == {"Cached"}  # no stage body ran
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:  # ... and the run still shows every report
        cached_run_artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[second_id])))
        import datetime as dt

        named = client.read_flow_run(second_id).name  # findable by name: `{pipeline}-{date}`, not random words
        assert named == f"demo-{dt.datetime.now(dt.UTC):%Y-%m-%d}", named
    assert {"data-funnel", "length-report", "loss-curve", "eval-comparison", "promotion-verdict", "night-cost",
            "cost-history"} <= {a.key for a in cached_run_artifacts}
    cached_cost = next(a for a in cached_run_artifacts if a.key == "night-cost")  # the cached night costs nothing
    cost_rows = json.loads(cached_cost.data) if isinstance(cached_cost.data, str) else cached_cost.data
    assert {r["tonight"] for r in cost_rows} == {"cached (costs nothing)"} and {r["requests"] for r in cost_rows} == {0}
    assert "teacher+judge 0 requests" in cached_cost.description and "GPU absent" in cached_cost.description
    assert {k: v.key for k, v in again.items()} == {k: v.key for k, v in refs.items()}

    changed = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(
        update={"lora": demo_cfg.train.lora.model_copy(update={"r": 8}), "epochs": 5.0})})
    third = _task_states(_run(changed, expect=None)[0], 9)  # 5 epochs may or may not pass the gate
    assert {n for n, s in third.items() if s != "Cached"} == {"train", "evaluate[tuned]", "promote"}
    assert third["evaluate[champion]"] == "Cached"  # the first run's adapter is in service: its evaluation is reused
    assert {third[n] for n in ("train", "evaluate[tuned]", "promote")} == {"Completed"}

    artifacts = artifacts_of(first_id)  # the run that did the work (the server is shared with other tests)
    keys = {a.key for a in artifacts}
    first_cost = next(a.data for a in artifacts if a.key == "night-cost")
    first_rows = {r["step"]: r for r in (json.loads(first_cost) if isinstance(first_cost, str) else first_cost)}
    assert first_rows["generate"]["requests"] == 35 and first_rows["train"]["tonight"] == "built"
    assert first_rows["train"]["gpu_hours"] == "absent: no CUDA device on this machine"  # never a fake zero
    assert {"resolved-config", "data-funnel", "length-report", "length-percentiles", "train-metrics", "loss-curve",
            "eval-comparison", "eval-flips", "promotion-verdict"} <= keys
    preview = next(a for a in artifacts if a.key == "template-preview").data  # what the loss is on, in bold
    assert "**The capital of Vardon is Quellis.&lt;|im\\_end|>**" in preview or "**The capital of Vardon is Quellis." in preview
    funnel = next(a for a in artifacts if a.key == "data-funnel").data  # generate's new rows head the funnel
    assert "35 new rows; answers: 0 reused, 35 generated" in str(funnel) and "exact_dedup" in str(funnel)
    length_report = next(a for a in artifacts if a.key == "length-report").data
    assert "data:image/png;base64," in length_report and "trained-token share" in length_report
    config_md = next(a for a in artifacts if a.key == "resolved-config").data
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first_id])))
    assert any(log.message.startswith("[distilabel.") for log in logs)  # distilabel's records in the run
    assert "lora:" in config_md and "student: tiny:student" in config_md


def test_gate_failing_on_purpose_ends_not_promoted_and_keeps_latest(prefect_server, demo_cfg):
    from synthtune.registry import Registry
    from synthtune.store import ArtifactStore

    store = ArtifactStore(demo_cfg.artifact_root)
    store.write_json(("registry", "demo", "latest.json"), {"adapter": "last night's"})
    strict = demo_cfg.model_copy(update={"promote": demo_cfg.promote.model_copy(update={"min_delta": 2.0})})
    flow_run_id, refs = _run(strict, expect="NotPromoted")
    assert Registry(store, "demo").latest() == {"adapter": "last night's"}
    assert "needs > +2.0000) FAILED: no better than base" in refs["promote"].summary["reasons"][1]  # after "no champion yet"

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    assert run.state.name == "NotPromoted" and "FAILED" in run.state.message
