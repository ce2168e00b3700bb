"""The DAG, and the loop without Prefect.

`DAG` is the single place that knows the edges: the Prefect flow (flows/pipeline.py) and
`run_all` here both walk it. `run_all` skips finished stages from their manifests; it is what the
CLI's per-stage commands and the GPU scripts use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.stages import evaluate, filter, generate, preflight, promote, template, train


@dataclass(frozen=True)
class Step:
    name: str  # unique within the DAG; the stage's name, or stage[variant]
    stage: ModuleType
    inputs: dict[str, str] = field(default_factory=dict)  # upstream argument name -> step name


DAG: tuple[Step, ...] = (
    Step("preflight", preflight),
    Step("generate", generate),
    Step("filter", filter, {"generate": "generate"}),
    Step("template", template, {"filter": "filter"}),
    Step("train", train, {"template": "template"}),
    # `filter` feeds evaluate's in-domain task; without evaluate.in_domain it is not in the key
    Step("evaluate[base]", evaluate, {"filter": "filter"}),
    Step("evaluate[tuned]", evaluate, {"train": "train", "filter": "filter"}),
    Step("promote", promote, {"base": "evaluate[base]", "tuned": "evaluate[tuned]", "train": "train"}),
)


def plan(cfg: PipelineConfig) -> dict[str, str]:
    """Every step's cache key, computed from the config alone (nothing runs)."""
    keys: dict[str, str] = {}
    for step in DAG:
        keys[step.name] = step.stage.key(cfg, {arg: keys[src] for arg, src in step.inputs.items()})
    return keys


def run_all(cfg: PipelineConfig, on_step: Callable[[str, ArtifactRef], None] | None = None,
            until: str | None = None) -> dict[str, ArtifactRef]:
    """Run the loop (up to and including stage `until`), returning each step's output reference."""
    store = ArtifactStore(cfg.artifact_root)
    refs: dict[str, ArtifactRef] = {}
    for step in DAG:
        refs[step.name] = step.stage.run(cfg, store, {arg: refs[src] for arg, src in step.inputs.items()})
        if on_step:
            on_step(step.name, refs[step.name])
        if until and step.stage.STAGE == until and all(s.stage.STAGE != until for s in DAG[DAG.index(step) + 1:]):
            break
    return refs
