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
