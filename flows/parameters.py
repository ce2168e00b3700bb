"""The flows' parameters besides the config, typed and described for the UI's run form."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

Refresh = Annotated[list[Literal["preflight", "generate", "filter", "template", "train", "evaluate", "promote"]],
                    Field(description="Rebuild these stages and everything after them even when finished (after "
                                      "an upgrade, say). Empty: reuse whatever is finished and intact.")]
FailStage = Annotated[Literal["none", "preflight", "generate", "filter", "template", "train", "evaluate", "promote"],
                      Field(description="Drill: make this stage fail on the run's first attempt (a Retry then "
                                        "succeeds). Keep `none` for real runs.")]
GpuDeployment = Annotated[str, Field(
    description="Split mode: run train and evaluate through this deployment (e.g. `synthtune-gpu/gpu-stages` "
                "on a GPU pool). Empty: every stage runs here.")]
GpuSlot = Annotated[str, Field(
    description="Concurrency slot held around the GPU stages. Empty: $SYNTHTUNE_GPU_SLOT, else gpu:<host>.")]


def run_name(suffix: str = "") -> str:
    """A flow run's name: `{pipeline}-{date}` (UTC), so a night's run is findable by name in the UI."""
    import datetime as dt

    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    name = getattr(config, "name", None) or (config.get("name") if isinstance(config, dict) else None) or "synthtune"
    return f"{name}{suffix}-{dt.datetime.now(dt.UTC):%Y-%m-%d}"


def gpu_run_name() -> str:
    return run_name("-gpu")


def announce() -> None:
    """Tell the terminal (`synthtune run` against a Prefect server) where this run's page is."""
    import os

    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    from synthtune import progress
    from synthtune.server import EMBEDDED

    if os.environ.get("PREFECT_API_URL") and not os.environ.get(EMBEDDED) and (
            url := url_for("flow-run", obj_id=flow_run.get_id())):
        progress.emit("flow_run", name=flow_run.get_name(), url=url)
