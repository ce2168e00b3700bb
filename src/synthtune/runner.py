"""The DAG, and the one loop that walks it, with or without an orchestrator.

`walk(cfg, execute, ...)` takes the steps in order. For each it finds what the step takes (upstream
outputs of this run, or the registry's champion), computes the step's key once (over the upstream
outputs' content digests: the early cutoff, see synthtune.keys), and calls
`execute(step, cfg, inputs, key, rebuild)`, which returns the output's ArtifactRef, `reused` when
it was already done. `local` runs the stage in this process (the CLI's `--engine local`, the
per-stage commands, the GPU scripts); the Prefect flow's executor runs it as the stage's task
(flows/pipeline.py). Progress events are emitted here, so both engines show the same lines.

Two inputs are not made by this run. `evaluate[champion]` evaluates the adapter in service (the
registry's champion) under this run's evaluation config; on the first night, or when tonight's
candidate is the champion already, there is nothing to compare with and the step is skipped. And
with `train.init: champion`, train's `parent` is the adapter it continues (synthtune.lineage.start);
without one the input is left out, so a night from base keeps the key it always had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType

from synthtune import ledger, lineage, progress, runs
from synthtune.configs import PipelineConfig
from synthtune.keys import pending
from synthtune.registry import Registry, RegistryError
from synthtune.stages import evaluate, filter, generate, preflight, promote, template, train
from synthtune.store import PIPELINE, ArtifactRef, ArtifactStore

CHAMPION = "champion"  # the input name that stands for the registry's champion, not a step of this run
PARENT = "parent"  # ... and for the adapter a continued night starts from (train.init: champion)
NO_CHAMPION = "no other champion to compare with"


@dataclass(frozen=True)
class Step:
    name: str  # unique within the DAG; the stage's name, or stage[variant]
    stage: ModuleType  # a module of synthtune.stages (the contract: synthtune.stages.Stage)
    inputs: dict[str, str] = field(default_factory=dict)  # upstream argument name -> step name (or CHAMPION, PARENT)


DAG: tuple[Step, ...] = (
    Step("preflight", preflight),
    Step("generate", generate),
    Step("filter", filter, {"generate": "generate"}),
    Step("template", template, {"filter": "filter"}),
    Step("train", train, {"template": "template", "parent": PARENT}),
    # `filter` feeds evaluate's in-domain task; without evaluate.in_domain it is not in the key
    Step("evaluate[base]", evaluate, {"filter": "filter"}),
    Step("evaluate[tuned]", evaluate, {"train": "train", "filter": "filter"}),
    Step("evaluate[champion]", evaluate, {"train": CHAMPION, "filter": "filter"}),
    Step("promote", promote, {"base": "evaluate[base]", "tuned": "evaluate[tuned]", "train": "train",
                              "champion": "evaluate[champion]"}),
)

# runs one step: (step, its config, its inputs, its key, rebuild even if finished) -> its output
Executor = Callable[[Step, PipelineConfig, dict[str, ArtifactRef], str, bool], ArtifactRef]


def check_registry(cfg: PipelineConfig, store: ArtifactStore) -> None:
    """Before any stage: the pipeline's registry reads (a torn history line is an error naming it; stale
    champion files are rebuilt from the history) and its champion's adapter is intact, unless it is
    tonight's candidate, which this run trains again (the same key makes the same adapter)."""
    registry = Registry(store, cfg.name)
    record = registry.champion()
    if record is not None and (bad := store.problems("train", record["train_key"])) \
            and plan(cfg).get("train") != record["train_key"]:
        raise RegistryError(f"the champion of '{cfg.name}', {record['train_key']} ({registry.uri('champion.json')}), "
                            f"is damaged: {'; '.join(bad[:3])}. Restore it, or `synthtune rollback --to TRAIN_KEY` "
                            "to another promoted adapter")


def champion_train(cfg: PipelineConfig, store: ArtifactStore, candidate_key: str | None) -> ArtifactRef | None:
    """The champion's train output, or None on the first night or when the candidate is the champion."""
    registry = Registry(store, cfg.name)
    record = registry.champion()
    if record is None or record["train_key"] == candidate_key:
        return None
    ref = store.ref("train", record["train_key"])
    if ref is None or store.problems("train", record["train_key"]):
        raise RegistryError(f"the champion {record['train_key']} ({registry.uri('champion.json')}) has no intact "
                            f"adapter at {registry.adapter_uri(record)}: restore it, or `synthtune rollback --to "
                            "TRAIN_KEY` to another")
    return ref


def step_config(cfg: PipelineConfig, step: Step, store: ArtifactStore) -> PipelineConfig:
    """The config a step runs with: the champion is evaluated on its own base model."""
    if CHAMPION not in step.inputs.values():
        return cfg
    record = Registry(store, cfg.name).champion()
    student = (record or {}).get("student") or cfg.student
    return cfg if student == cfg.student else cfg.model_copy(update={"student": student})


def outside_inputs(cfg: PipelineConfig, store: ArtifactStore, step: Step, keys: dict[str, str]
                   ) -> dict[str, ArtifactRef | None]:
    """The step's inputs this run does not make, by source name ({CHAMPION: ..., PARENT: ...}, the
    ones it takes), from this run's keys so far (`keys`: step name -> key): the champion to compare
    with (None on the first night or when the candidate is the champion), the adapter a continued
    night starts from (None from base)."""
    out: dict[str, ArtifactRef | None] = {}
    if CHAMPION in step.inputs.values():
        out[CHAMPION] = champion_train(cfg, store, keys.get("train"))
    if PARENT in step.inputs.values():
        out[PARENT] = lineage.start(cfg, store, keys.get("template")).parent
    return out


def step_inputs(step: Step, done: dict[str, ArtifactRef], outside: dict[str, ArtifactRef | None]
                ) -> dict[str, ArtifactRef] | None:
    """A step's upstream references; None when the step has nothing to do (no champion to evaluate)."""
    if CHAMPION in outside and outside[CHAMPION] is None:
        return None
    out = {}
    for arg, src in step.inputs.items():
        ref = outside.get(src) if src in outside else done.get(src)
        if ref is not None:
            out[arg] = ref
    return out


def downstream(names: Iterable[str]) -> set[str]:
    """The steps named (a stage name means all its steps) and every step that depends on them."""
    names, out = set(names), set()
    for step in DAG:
        if step.name in names or step.stage.STAGE in names or any(src in out for src in step.inputs.values()):
            out.add(step.name)
    return out


def local(step: Step, cfg: PipelineConfig, inputs: dict[str, ArtifactRef], key: str, rebuild: bool) -> ArtifactRef:
    """The executor without an orchestrator: the stage in this process."""
    return step.stage.run(cfg, ArtifactStore(cfg.artifact_root), inputs, output_key=key, rebuild=rebuild)


def walk(cfg: PipelineConfig, execute: Executor, steps: Iterable[Step] = DAG, refs: dict[str, ArtifactRef] | None = None,
         refresh: Iterable[str] = (), on_step: Callable[[str, ArtifactRef], None] | None = None
         ) -> dict[str, ArtifactRef]:
    """Run `steps` in order through `execute`; returns every step's output (added to `refs`, which holds
    the outputs of steps run before, e.g. by another segment of the same run). The stages named in
    `refresh` and every step after them are rebuilt even if finished."""
    store = ArtifactStore(cfg.artifact_root)
    refs = {} if refs is None else refs
    rebuild = downstream(refresh)
    steps = tuple(steps)
    if steps and steps[0] is DAG[0]:  # the start of a run: registry problems surface before any stage
        check_registry(cfg, store)
    for step in steps:
        outside = outside_inputs(cfg, store, step, {name: ref.key for name, ref in refs.items()})
        if (parent := outside.get(PARENT)) is not None:
            runs.using(store, parent.stage, parent.key)  # what it continues stays until it is trained
        inputs = step_inputs(step, refs, outside)
        if inputs is None:  # no champion to compare with (the first night, or the candidate is the champion)
            progress.emit("step_end", step=step.name, state="Skipped", summary={"note": NO_CHAMPION})
            continue
        step_cfg = step_config(cfg, step, store)
        key = step.stage.key(step_cfg, {arg: ref.digest for arg, ref in inputs.items()})
        runs.using(store, step.stage.STAGE, key)  # before it is read or made: gc must see the run uses it
        progress.emit("step_start", step=step.name)
        token = PIPELINE.set(cfg.name)
        try:
            ref = execute(step, step_cfg, inputs, key, step.name in rebuild)
        except BaseException:
            progress.emit("step_end", step=step.name, state="Failed")
            raise
        finally:
            PIPELINE.reset(token)
        refs[step.name] = ref
        progress.emit("step_end", step=step.name, state="Cached" if ref.reused else "Completed", summary=ref.summary,
                      uri=ref.uri)
        if on_step:
            on_step(step.name, ref)
    return refs


def plan(cfg: PipelineConfig) -> dict[str, str]:
    """Every step's key, computed from the config, the registry and the outputs already on the root
    (nothing runs). A step whose upstream output is not built yet gets a provisional key (over a
    stand-in for that output's digest), which changes when the output exists. A skipped step (no
    champion to compare with) has no key."""
    store = ArtifactStore(cfg.artifact_root)
    keys: dict[str, str] = {}
    digests: dict[str, str] = {}
    for step in DAG:
        outside = outside_inputs(cfg, store, step, keys)
        if CHAMPION in outside and outside[CHAMPION] is None:
            continue
        ups = {arg: (outside[src].digest if src in outside else digests[src]) for arg, src in step.inputs.items()
               if outside.get(src) is not None or src in digests}
        keys[step.name] = step.stage.key(step_config(cfg, step, store), ups)
        ref = store.ref(step.stage.STAGE, keys[step.name])
        digests[step.name] = ref.digest if ref else pending(step.stage.STAGE, keys[step.name])
    return keys


def run_all(cfg: PipelineConfig, on_step: Callable[[str, ArtifactRef], None] | None = None,
            until: str | None = None, refresh: Iterable[str] = ()) -> dict[str, ArtifactRef]:
    """The loop without an orchestrator (up to and including stage `until`), tracked in MLflow when the
    config asks; returns each step's output."""
    import uuid

    from synthtune import tracking

    steps = DAG
    if until:
        last = max(i for i, s in enumerate(DAG) if s.stage.STAGE == until)
        steps = DAG[:last + 1]
    run_id = str(uuid.uuid4())
    with runs.leased(ArtifactStore(cfg.artifact_root), cfg.name, run_id), \
            tracking.session(cfg, pipeline_run=run_id, name=f"{cfg.name}-local"):
        refs = walk(cfg, local, steps, refresh=refresh, on_step=on_step)
        if steps[-1] is DAG[-1]:  # a whole night: what it cost (synthtune.ledger)
            ledger.record(cfg, refs, run_id)
        return refs
