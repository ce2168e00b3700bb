"""What a night cost, in the Prefect UI: the run's ledger (synthtune.ledger) as a table, and the cost
per night over the pipeline's history as a chart."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from synthtune import ledger
from synthtune.configs import PipelineConfig
from synthtune.store import ArtifactRef, ArtifactStore


def report_cost(config: PipelineConfig, refs: dict[str, ArtifactRef]) -> dict:
    """Record this run's ledger on the artifact root (and in MLflow, through the tracking listener), and
    publish it: the `night-cost` table and the `cost-history` chart."""
    night = ledger.record(config, refs, str(flow_run.get_id()))
    create_table_artifact(ledger.table_rows(night), key="night-cost",
                          description=f"What tonight cost: {ledger.summary_line(night)}")
    nights = ledger.history(ArtifactStore(config.artifact_root), config.name, 30)
    with tempfile.TemporaryDirectory() as tmp:
        ledger.plot_history(nights, Path(tmp) / "cost.png")
        png = base64.b64encode((Path(tmp) / "cost.png").read_bytes()).decode()
    create_markdown_artifact(f"## Cost per night: {config.name}\n\n{ledger.summary_line(night)}\n\n"
                             f"![cost per night](data:image/png;base64,{png})\n\n`synthtune cost` prints it as a table.",
                             key="cost-history", description="Cost per night over the last 30 nights")
    return night
