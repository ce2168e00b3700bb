"""MLflow tracking against a real `mlflow server` (sqlite backend, served artifacts) started here:
the flow's runs are read back from the server (params, metrics, artifacts, the logged adapter, the
`@champion` alias), and an unreachable server stops a run before any stage."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from synthtune.server import free_port
from tests.support import DEMO
from tests.support.flows import artifacts_of
from tests.support.servers import mlflow_server


def test_an_unreachable_server_is_named_before_anything_runs(demo_cfg, tmp_path):
    port = free_port()  # nothing listens there
    result = CliRunner().invoke(app, ["run", str(DEMO), f"artifact_root={tmp_path / 'root'}", "--engine", "local",
                                      f"tracking.mlflow_uri=http://127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert f"tracking.mlflow_uri http://127.0.0.1:{port}: unreachable" in " ".join(result.output.split())
    assert not (tmp_path / "root" / "generate").exists() and not (tmp_path / "root" / "train").exists()

    from synthtune.stages.preflight import checks
    from synthtune.store import ArtifactStore

    cfg = demo_cfg.model_copy(update={"tracking": demo_cfg.tracking.model_copy(
        update={"mlflow_uri": f"http://127.0.0.1:{port}"})})
    problems, _ = checks(cfg, ArtifactStore(cfg.artifact_root))
    assert any(p.startswith(f"tracking.mlflow_uri http://127.0.0.1:{port}: unreachable") for p in problems), problems


def test_a_server_gone_mid_run_is_a_warning_never_a_failure(demo_cfg, caplog):
    from mlflow import MlflowClient

    from synthtune.tracking import Session

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    dead = f"http://127.0.0.1:{free_port()}"
    session = Session(demo_cfg, MlflowClient(tracking_uri=dead), "run-id", "0", None)
    session({"kind": "step_end", "step": "filter", "state": "Completed", "summary": {"rows": {"kept": 3}}})
    assert any("MLflow" in r.message and "logging filter failed" in r.message for r in caplog.records)


def test_tracking_fields_change_no_cache_key(demo_cfg):
    from synthtune.runner import plan

    tracked = demo_cfg.model_copy(update={"tracking": demo_cfg.tracking.model_copy(update={
        "mlflow_uri": "sqlite:///x.db", "experiment": "other", "registered_model": "m", "report_to": ["trackio"]})})
    assert plan(tracked) == plan(demo_cfg)


@pytest.mark.flows
def test_each_flow_run_is_an_mlflow_run_with_params_metrics_charts_adapter_and_champion_alias(demo_cfg, tmp_path,
                                                                                             prefect_server):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline

    with mlflow_server(tmp_path) as uri:
        tracking = {"mlflow_uri": uri, "experiment": "nightly", "registered_model": "demo-student"}
        short = {"epochs": 20, "logging_steps": 5}  # a third of the demo's training: enough to beat base
        cfg = demo_cfg.model_copy(update={"tracking": demo_cfg.tracking.model_copy(update=tracking),
                                          "train": demo_cfg.train.model_copy(update=short)})
        first = pipeline(cfg, return_state=True)
        assert first.is_completed(), first
        client = MlflowClient(tracking_uri=uri)
        [experiment] = [e for e in client.search_experiments() if e.name == "nightly"]
        [run] = client.search_runs([experiment.experiment_id])
        flow_run_id = str(first.state_details.flow_run_id)
        assert run.data.tags["prefect.flow_run_id"] == flow_run_id and run.info.status == "FINISHED"
        params = run.data.params
        assert params["train.learning_rate"] == str(cfg.train.learning_rate) and params["student"] == "tiny:student"
        assert params["tracking.mlflow_uri"] == uri
        metrics = run.data.metrics
        # TRL's own metrics, logged live by the training child into this run
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) >= 10 and history[-1].value < history[0].value
        assert metrics["train.tokens_per_s"] > 0 and "train.mfu" not in metrics  # no MFU on a CPU
        assert (metrics["filter.rows.input"], metrics["filter.rows.kept"]) == (35, 32)
        assert metrics["tuned.demo_facts.acc"] > metrics["base.demo_facts.acc"]
        assert metrics["promote.promoted"] == 1
        assert metrics["cost.teacher.requests"] == 35 and metrics["cost.teacher.completion_tokens"] > 0  # the ledger
        assert "cost.gpu_hours" not in metrics and "GPU absent" in run.data.tags["synthtune.cost"]  # none on a CPU
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "train")} | {
            a.path for a in client.list_artifacts(run.info.run_id, "promote")}
        assert {"train/loss.png", "promote/comparison.png", "promote/verdict.json"} <= artifacts
        train_key = run.data.tags["synthtune.train_key"]
        [model] = client.search_logged_models([experiment.experiment_id])
        assert model.tags["synthtune.train_key"] == train_key and model.source_run_id == run.info.run_id
        champion = client.get_model_version_by_alias("demo-student", "champion")
        assert champion.tags["synthtune.train_key"] == train_key
        [link] = artifacts_of(first.state_details.flow_run_id, "mlflow-run")
        assert f"{uri}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in link.data

        # the next night: another candidate, compared with the champion; a Cached train is logged from its output
        second_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})})
        second = pipeline(second_cfg, return_state=True)
        assert second.is_completed(), second
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
        assert len(runs) == 2
        latest = runs[0]
        assert latest.data.tags["prefect.flow_run_id"] == str(second.state_details.flow_run_id)
        assert "champion.demo_facts.acc" in latest.data.metrics and "tuned.demo_facts.acc" in latest.data.metrics
        promoted = latest.data.metrics["promote.promoted"] == 1
        alias = client.get_model_version_by_alias("demo-student", "champion").tags["synthtune.train_key"]
        assert alias == (latest.data.tags["synthtune.train_key"] if promoted else train_key)

        # a rollback on the artifact root moves the alias too
        if promoted:
            result = CliRunner().invoke(app, ["rollback", str(DEMO), f"artifact_root={cfg.artifact_root}",
                                              f"tracking.mlflow_uri={uri}", "tracking.registered_model=demo-student"])
            assert result.exit_code == 0, result.output
            assert client.get_model_version_by_alias("demo-student", "champion").tags["synthtune.train_key"] == train_key

        # the same config again: every stage Cached, and still a complete MLflow run (the replay of a lost one)
        third = pipeline(cfg, return_state=True)
        assert third.is_completed()
        newest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
        assert newest.data.tags["prefect.flow_run_id"] == str(third.state_details.flow_run_id)
        assert len(client.get_metric_history(newest.info.run_id, "loss")) == len(history)
        assert newest.data.metrics["tuned.demo_facts.acc"] == metrics["tuned.demo_facts.acc"]
        assert newest.data.metrics["cost.teacher.requests"] == 0  # a cached night asked nobody anything
        assert "teacher+judge 0 requests" in newest.data.tags["synthtune.cost"]
