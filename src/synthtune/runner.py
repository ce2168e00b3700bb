"""The DAG, and the loop without Prefect.

`DAG` is the single place that knows the edges: the Prefect flow (flows/pipeline.py) and
`run_all` here both walk it. `run_all` skips finished stages from their manifests; it is what the
CLI's per-stage commands and the GPU scripts use.

One step's input is not made by this run: `evaluate[champion]` evaluates the adapter in service
(the registry's champion) under this run's evaluation config. On the first night, or when tonight's
candidate is the champion already, there is nothing to compare with and the step is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType

from synthtune import progress
from synthtune.artifacts import REBUILD, ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.registry import Registry, RegistryError
from synthtune.stages import evaluate, filter, generate, preflight, promote, template, train

CHAMPION = "champion"  # the input name that stands for the registry's champion, not a step of this run


@dataclass(frozen=True)
class Step:
    name: str  # unique within the DAG; the stage's name, or stage[variant]
    stage: ModuleType
    inputs: dict[str, str] = field(default_factory=dict)  # upstream argument name -> step name (or CHAMPION)


DAG: tuple[Step, ...] = (
    Step("preflight", preflight),
    Step("generate", generate),
    Step("filter", filter, {"generate": "generate"}),
    Step("template", template, {"filter": "filter"}),
    Step("train", train, {"template": "template"}),
    # `filter` feeds evaluate's in-domain task; without evaluate.in_domain it is not in the key
    Step("evaluate[base]", evaluate, {"filter": "filter"}),
    Step("evaluate[tuned]", evaluate, {"train": "train", "filter": "filter"}),
    Step("evaluate[champion]", evaluate, {"train": CHAMPION, "filter": "filter"}),
    Step("promote", promote, {"base": "evaluate[base]", "tuned": "evaluate[tuned]", "train": "train",
                              "champion": "evaluate[champion]"}),
)


def champion_train(cfg: PipelineConfig, store: ArtifactStore, candidate_key: str | None) -> ArtifactRef | None:
    """The champion's train output, or None on the first night or when the candidate is the champion."""
    record = Registry(store).champion()
    if record is None or record["train_key"] == candidate_key:
        return None
    ref = store.ref("train", record["train_key"])
    if ref is None or not store.fs.exists(store._path("train", record["train_key"], "adapter")):
        raise RegistryError(f"the champion {record['train_key']} ({Registry(store).uri('champion.json')}) has no adapter "
                            f"at {record['adapter']}: restore it, or `synthtune rollback --to TRAIN_KEY` to another")
    return ref


def step_config(cfg: PipelineConfig, step: Step, store: ArtifactStore) -> PipelineConfig:
    """The config a step runs with: the champion is evaluated on its own base model."""
    if CHAMPION not in step.inputs.values():
        return cfg
    record = Registry(store).champion()
    student = (record or {}).get("student") or cfg.student
    return cfg if student == cfg.student else cfg.model_copy(update={"student": student})


def step_inputs(step: Step, done: dict[str, ArtifactRef | None], champion: ArtifactRef | None
                ) -> dict[str, ArtifactRef] | None:
    """A step's upstream references; None when the step has nothing to do (no champion to evaluate)."""
    if CHAMPION in step.inputs.values() and champion is None:
        return None
    out = {}
    for arg, src in step.inputs.items():
        ref = champion if src == CHAMPION else done.get(src)
        if ref is not None:
            out[arg] = ref
    return out


NO_CHAMPION = "no other champion to compare with"


def skipped(step: Step) -> None:
    """Tell synthtune.progress that a step had nothing to do (no champion: the first night, or the
    candidate is the champion)."""
    progress.emit("step_end", step=step.name, state="Skipped", summary={"note": NO_CHAMPION})


def _run_step(step: Step, cfg: PipelineConfig, store: ArtifactStore, inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    """One step, its start and end told to synthtune.progress (Cached when its output was already there)."""
    import time

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    progress.emit("step_start", step=step.name)
    try:
        ref = step.stage.run(cfg, store, inputs)
    except BaseException:
        progress.emit("step_end", step=step.name, state="Failed")
        raise
    built = (store.manifest(ref.stage, ref.key) or {}).get("created_at", "") >= started
    progress.emit("step_end", step=step.name, state="Completed" if built else "Cached", summary=ref.summary,
                  uri=ref.uri)
    return ref


def plan(cfg: PipelineConfig) -> dict[str, str]:
    """Every step's cache key, computed from the config and the registry (nothing runs). A skipped
    step (no champion to compare with) has no key."""
    store = ArtifactStore(cfg.artifact_root)
    keys: dict[str, str] = {}
    for step in DAG:
        champion = None
        if CHAMPION in step.inputs.values():
            champion = champion_train(cfg, store, keys.get("train"))
            if champion is None:
                continue
        ups = {arg: (champion.key if src == CHAMPION else keys[src]) for arg, src in step.inputs.items()
               if src == CHAMPION or src in keys}
        keys[step.name] = step.stage.key(step_config(cfg, step, store), ups)
    return keys


def downstream(names: Iterable[str]) -> set[str]:
    """The steps named (a stage name means all its steps) and every step that depends on them."""
    names, out = set(names), set()
    for step in DAG:
        if step.name in names or step.stage.STAGE in names or any(src in out for src in step.inputs.values()):
            out.add(step.name)
    return out


def rebuild_keys(cfg: PipelineConfig, refresh: Iterable[str]) -> frozenset[tuple[str, str]]:
    """(stage, key) of every output `--refresh` asks to rebuild: the stages named and what follows."""
    steps, keys = downstream(refresh), plan(cfg)
    return frozenset((s.stage.STAGE, keys[s.name]) for s in DAG if s.name in steps and s.name in keys)


def run_all(cfg: PipelineConfig, on_step: Callable[[str, ArtifactRef], None] | None = None,
            until: str | None = None, refresh: Iterable[str] = ()) -> dict[str, ArtifactRef]:
    """Run the loop (up to and including stage `until`), returning each step's output reference;
    the stages in `refresh` and everything after them are rebuilt even if finished."""
    import uuid

    from synthtune import tracking

    token = REBUILD.set(rebuild_keys(cfg, refresh))
    try:
        with tracking.session(cfg, pipeline_run=str(uuid.uuid4()), name=f"{cfg.name}-local"):
            return _run_all(cfg, on_step, until)
    finally:
        REBUILD.reset(token)


def _run_all(cfg: PipelineConfig, on_step, until) -> dict[str, ArtifactRef]:
    store = ArtifactStore(cfg.artifact_root)
    refs: dict[str, ArtifactRef] = {}
    for step in DAG:
        champion = champion_train(cfg, store, refs["train"].key) if CHAMPION in step.inputs.values() else None
        inputs = step_inputs(step, refs, champion)
        if inputs is None:
            skipped(step)
        else:
            refs[step.name] = _run_step(step, step_config(cfg, step, store), store, inputs)
            if on_step:
                on_step(step.name, refs[step.name])
        if until and step.stage.STAGE == until and all(s.stage.STAGE != until for s in DAG[DAG.index(step) + 1:]):
            break
    return refs
