"""The post-training loop as Prefect flows: every stage a cached, retryable task.

Run as: synthtune run [CONFIG] [a.b=value ...]     (embedded Prefect server, no setup)
Deploy: prefect deploy --prefect-file deployments/prefect.yaml --all

Two ways to place the stages on machines:
- one pool (one GPU box): `pipeline` runs every stage where its worker runs;
- split: `pipeline` runs the data stages on a CPU pool and hands the GPU stages (train, evaluate)
  to the `gpu_stages` flow deployed on a GPU pool (`gpu_deployment=...`). The two only share the
  artifact root: the child finds its inputs there by key, and the parent finds the child's outputs.

Either way the GPU stages hold the worker's GPU slot (tasks/gpu_slot.py), so two runs never
share a GPU, and a dead holder never keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Literal

# deployments load this file by path; make `tasks` importable from the project root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Annotated  # noqa: E402

from prefect import flow  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402
from prefect.filesystems import RemoteFileSystem  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402
from prefect.states import Completed  # noqa: E402
from pydantic import Field  # noqa: E402

from synthtune import progress, tracking  # noqa: E402
from synthtune.artifacts import REBUILD, ArtifactRef, ArtifactStore  # noqa: E402
from synthtune.config import PipelineConfig, to_yaml  # noqa: E402
from synthtune.runner import (  # noqa: E402
    CHAMPION,
    DAG,
    Step,
    champion_train,
    downstream,
    rebuild_keys,
    skipped,
    step_config,
    step_inputs,
)
from synthtune.terminal import redirect_stream_handlers  # noqa: E402
from tasks._common import FAULT  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.filter import filter  # noqa: E402
from tasks.filter import report as filter_report  # noqa: E402
from tasks.generate import generate  # noqa: E402
from tasks.gpu_slot import hold as hold_gpu  # noqa: E402
from tasks.gpu_slot import release_for_flow_run, slot_name  # noqa: E402
from tasks.preflight import preflight  # noqa: E402
from tasks.promote import promote  # noqa: E402
from tasks.promote import report as promote_report  # noqa: E402
from tasks.template import report as template_report  # noqa: E402
from tasks.template import template  # noqa: E402
from tasks.train import report as train_report  # noqa: E402
from tasks.train import train  # noqa: E402

TASKS = {t.name: t for t in (preflight, generate, filter, template, train, evaluate, promote)}
# a stage's Prefect artifacts (funnel, length report, loss curve, eval table, verdict), made by the
# flow from the stage's output: every run shows them, also when the stage came back `Cached`
REPORTS = {"filter": filter_report, "template": template_report, "train": train_report, "promote": promote_report}
GPU_STAGES = ("train", "evaluate")
GPU_STEPS = tuple(s for s in DAG if s.stage.STAGE in GPU_STAGES)
_first, _last = DAG.index(GPU_STEPS[0]), DAG.index(GPU_STEPS[-1])
assert DAG[_first:_last + 1] == GPU_STEPS, "the GPU stages must be consecutive in the DAG"
BEFORE_GPU, AFTER_GPU = DAG[:_first], DAG[_last + 1:]

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


def result_storage(cfg: PipelineConfig):
    """Prefect's persisted task results live beside the artifacts, so caching survives restarts and
    a retry on another machine finds finished stages."""
    store = ArtifactStore(cfg.artifact_root)
    if store.local:
        return Path(store.root) / ".prefect-results"
    # object stores: a saved RemoteFileSystem block (fsspec underneath), named after the root
    name = "synthtune-results-" + hashlib.sha256(store.uri().encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=store.uri(".prefect-results")).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def drain() -> None:
    """Send what Prefect still queues (run logs, events) while its server is up: the embedded
    server stops right after the flow returns."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=30)


class _PipeGuard:
    """A stdout/stderr whose reader (the worker) died: writes are dropped, not raised as
    BrokenPipeError into whatever stage happened to print, and the watchdog is woken."""

    def __init__(self, stream, broken: threading.Event) -> None:
        self._stream, self._broken = stream, broken

    def write(self, text: str) -> int:
        if not self._broken.is_set():
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):
                self._broken.set()
        return len(text)

    def flush(self) -> None:
        if not self._broken.is_set():
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._broken.set()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def follow_the_worker() -> None:
    """A flow run a worker started ends when that worker dies, instead of training on unsupervised
    or failing on a BrokenPipeError from the first line it prints: it sends itself SIGTERM, so
    Prefect records it `Crashed` and runs its on_crashed hooks (which give the GPU slot back); the
    training child dies with it. A run whose whole machine is gone stops sending heartbeats, and
    the zombie automation (deployments/automations.py) marks it `Crashed`."""
    if not deployment.get_id():  # the CLI's own process: nothing to follow
        return
    worker, broken = os.getppid(), threading.Event()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        guard = _PipeGuard(stream, broken)
        redirect_stream_handlers(stream, guard)
        setattr(sys, name, guard)

    def watch() -> None:
        while os.getppid() == worker and not broken.wait(1):
            pass
        logging.getLogger("synthtune").error("the worker (pid %d) is gone: ending this flow run", worker)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="synthtune-follow-worker", daemon=True).start()


def give_back_gpu(flow, run, state) -> None:
    """on_crashed / on_cancellation: a run that dies holding the GPU slot gives it back now, not
    when its lease runs out (its process may be gone, so this runs wherever Prefect runs hooks)."""
    with contextlib.suppress(Exception):
        release_for_flow_run(slot_name(run.parameters.get("gpu_slot", "")), str(run.id))


def run_steps(config: PipelineConfig, steps: tuple[Step, ...], refs: dict[str, ArtifactRef], fault: str,
              storage, refresh: list[str] | tuple[str, ...] = ()) -> None:
    """Each step as its task (results persisted to `storage`), outputs added to `refs` (which holds
    every step's inputs), and its report as Prefect artifacts of this flow run. A step whose output
    is missing or no longer matches its manifest, or that `refresh` asks for, runs even if Prefect
    holds a cached result for its key (which would point at that output)."""
    store = ArtifactStore(config.artifact_root)
    refreshed = downstream(refresh)
    tokens = FAULT.set(fault), REBUILD.set(rebuild_keys(config, refresh) if refresh else frozenset())
    try:
        for step in steps:
            champion = champion_train(config, store, refs["train"].key) if CHAMPION in step.inputs.values() else None
            inputs = step_inputs(step, refs, champion)
            if inputs is None:  # no champion to compare with (the first night, or the candidate is the champion)
                skipped(step)
                continue
            cfg = step_config(config, step, store)
            key = step.stage.key(cfg, {arg: ref.key for arg, ref in inputs.items()})
            # the drill's stage runs even when cached: a finished stage must still fail on purpose
            stale = step.name in refreshed or fault == step.stage.STAGE or store.ref(step.stage.STAGE, key) is None \
                or bool(store.problems(step.stage.STAGE, key))
            task = TASKS[step.stage.STAGE].with_options(task_run_name=step.name, result_storage=storage,
                                                        refresh_cache=stale)
            progress.emit("step_start", step=step.name)
            state = task(cfg, inputs, return_state=True)
            if not state.is_completed():
                progress.emit("step_end", step=step.name, state="Failed")
            refs[step.name] = state.result()  # the task's exception when it failed
            progress.emit("step_end", step=step.name, state=state.name, summary=refs[step.name].summary,
                          uri=refs[step.name].uri)
            if report := REPORTS.get(step.stage.STAGE):
                report(store, refs[step.name])
    finally:
        FAULT.reset(tokens[0])
        REBUILD.reset(tokens[1])


@contextlib.contextmanager
def tracked(config: PipelineConfig, owner: bool):
    """This flow run's MLflow run (when tracking.mlflow_uri is set), linked from a Prefect artifact.
    The split-mode GPU child joins its parent's MLflow run (both know the root flow run's id)."""
    run_id = flow_run.get_id()
    root = flow_run.get_root_flow_run_id() if run_id else None
    tags = {"prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(flow_run.get_name())}
    with tracking.session(config, pipeline_run=str(root or run_id), name=str(flow_run.get_name()), tags=tags,
                          owner=owner) as tracker:
        if tracker is not None and owner:
            where = f"MLflow run `{tracker.run_id}` in experiment `{config.tracking.experiment}` at {config.tracking.mlflow_uri}"
            if tracker.url:
                create_link_artifact(tracker.url, link_text=where, key="mlflow-run", description="This run in MLflow")
            else:
                create_markdown_artifact(where, key="mlflow-run", description="This run in MLflow")
        yield tracker


def this_attempts_fault(fail_stage: str) -> str:
    """The drill fails only the first attempt: a retry of the run (from the UI, say) goes through."""
    return fail_stage if (flow_run.get_run_count() or 1) <= 1 else "none"


@flow(name="synthtune", log_prints=False, persist_result=True, on_crashed=[give_back_gpu],
      on_cancellation=[give_back_gpu])
def pipeline(config: PipelineConfig, gpu_deployment: GpuDeployment = "", gpu_slot: GpuSlot = "",
             fail_stage: FailStage = "none", refresh: Refresh = []) -> dict[str, ArtifactRef]:  # noqa: B006
    """preflight -> generate -> filter -> template -> train -> evaluate (base, tuned, champion) -> promote.

    Ends `Completed`, or `Completed` named `NotPromoted` (reasons in its message and the
    promotion-verdict artifact) when the candidate failed the gate and the champion stays in service."""
    follow_the_worker()
    create_markdown_artifact(f"```yaml\n{to_yaml(config)}```", key="resolved-config",
                             description=f"Resolved config of pipeline '{config.name}'")
    if deployment.get_name():  # what the model card names as the command that produced the adapter
        os.environ["SYNTHTUNE_COMMAND"] = (f"prefect deployment run '{flow_run.get_flow_name()}/{deployment.get_name()}'"
                                           f" (flow run {flow_run.get_name()})")
    fault, storage = this_attempts_fault(fail_stage), result_storage(config)
    refs: dict[str, ArtifactRef] = {}
    with tracked(config, owner=True):
        run_steps(config, BEFORE_GPU, refs, fault, storage, refresh)
        if gpu_deployment:
            refs.update(_gpu_stages_elsewhere(config, gpu_deployment, gpu_slot, refs, fault, refresh))
        else:
            with hold_gpu(slot_name(gpu_slot)):
                run_steps(config, GPU_STEPS, refs, fault, storage, refresh)
        run_steps(config, AFTER_GPU, refs, fault, storage, refresh)
    verdict = refs["promote"].summary
    if not verdict["promoted"]:  # a finished run whose adapter failed the gate: say so in the run's state
        return Completed(name="NotPromoted", message="; ".join(verdict["reasons"]), data=refs)
    return refs


@flow(name="synthtune-gpu", log_prints=False, persist_result=True, on_crashed=[give_back_gpu],
      on_cancellation=[give_back_gpu])
def gpu_stages(config: PipelineConfig, upstream: dict[str, ArtifactRef], gpu_slot: GpuSlot = "",
               fail_stage: FailStage = "none", refresh: Refresh = []) -> dict[str, ArtifactRef]:  # noqa: B006
    """train and evaluate (base, tuned, champion) on a GPU worker, for a `pipeline` run in split mode.
    Its outputs are handed back through the artifact root (`handoff/<this run's id>.json`): their
    keys depend on what this GPU machine resolves (quantization, kernels), which the parent cannot know."""
    follow_the_worker()
    refs = dict(upstream)
    with tracked(config, owner=False), hold_gpu(slot_name(gpu_slot)):
        run_steps(config, GPU_STEPS, refs, fail_stage, result_storage(config), refresh)
    out = {s.name: refs[s.name] for s in GPU_STEPS if s.name in refs}
    store = ArtifactStore(config.artifact_root)
    store.write_json(("handoff", f"{flow_run.get_id()}.json"), {k: v.model_dump(mode="json") for k, v in out.items()})
    return out


def _gpu_stages_elsewhere(config: PipelineConfig, deployment: str, gpu_slot: str, refs: dict[str, ArtifactRef],
                          fault: str, refresh: list[str]) -> dict[str, ArtifactRef]:
    """Run the GPU steps as a child flow run of `deployment`, then read their outputs from the
    artifact root (no result has to travel back through Prefect)."""
    from prefect.deployments import run_deployment

    needed = {src for s in GPU_STEPS for src in s.inputs.values() if src in refs}
    child = run_deployment(deployment, timeout=None, parameters={
        "config": config.model_dump(mode="json"),
        "upstream": {name: refs[name].model_dump(mode="json") for name in sorted(needed)},
        "gpu_slot": gpu_slot, "fail_stage": fault, "refresh": list(refresh)})
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise RuntimeError(f"GPU stages ({deployment}, run {child.name}) ended {state}: "
                           f"{child.state.message if child.state else ''}")
    store = ArtifactStore(config.artifact_root)
    handed = store.read_json(("handoff", f"{child.id}.json"))
    if handed is None:
        raise RuntimeError(f"GPU stages run {child.name} completed but left no {store.uri('handoff', f'{child.id}.json')}")
    out = {}
    for name, data in handed.items():
        ref = ArtifactRef.model_validate(data)
        if store.ref(ref.stage, ref.key) is None:
            raise RuntimeError(f"GPU stages run {child.name} completed but {name} is not at {ref.uri}")
        out[name] = ref
    return out
