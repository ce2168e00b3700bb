"""Experiment tracking settings (MLflow, TRL report_to); in no cache key."""

from __future__ import annotations

from synthtune.fields import Section, field


class TrackingConfig(Section):
    """MLflow (one run per pipeline run, the champion's alias) and TRL's other `report_to` integrations.
    In no cache key."""

    mlflow_uri: str = field(
        "", "MLflow tracking URI: `http://host:5000`, `sqlite:///path/mlflow.db` or `file:/path/mlruns`. Empty: no "
        "MLflow. One MLflow run per pipeline run (params, metrics, charts, the adapter as a logged model, "
        "`@champion` on promotion).", affects_output=False)
    experiment: str = field("synthtune", "MLflow experiment the runs go to.", affects_output=False)
    registered_model: str = field(
        "", "Registered model whose `@champion` alias follows promotions (and rollbacks). Empty: the pipeline's name.",
        affects_output=False)
    report_to: list[str] = field(
        [], "TRL `report_to` integrations besides MLflow, e.g. [trackio] or [wandb] (configured by their own "
        "environment variables).", affects_output=False)
