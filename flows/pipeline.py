"""The post-training loop as Prefect flows: every stage a retryable task, `Cached` when already done.

Run as: synthtune run [CONFIG] [a.b=value ...]     (embedded Prefect server, no setup)
Deploy: synthtune deploy CONFIG --name nightly --cron "0 2 * * *"   (or deployments/prefect.yaml)

The steps and their order are synthtune.runner's (one loop for every engine); this file only says
how a step runs here (as its task, its reports published) and where: the GPU steps hold the worker's
GPU slot (tasks/gpu_slot.py), or run on a GPU pool in split mode (flows/split.py).
"""

from __future__ import annotations

import os

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run
from prefect.states import Completed

from flows.cost import report_cost
from flows.parameters import FailStage, GpuDeployment, GpuSlot, Refresh, announce, gpu_run_name, run_name
from flows.split import hand_back, run_elsewhere
from flows.tracking import tracked
from flows.watchdog import follow_the_worker, give_back_gpu
from synthtune.config import to_yaml
from synthtune.configs import PipelineConfig
from synthtune.runner import DAG, Executor, walk
from synthtune.runs import leased
from synthtune.store import ArtifactRef, ArtifactStore
from tasks import evaluate, filter, generate, preflight, promote, template, train
from tasks._common import FAULT
from tasks.gpu_slot import hold as hold_gpu
from tasks.gpu_slot import slot_name

TASKS = {m.__name__.rsplit(".", 1)[1]: m for m in (preflight, generate, filter, template, train, evaluate, promote)}
GPU_STEPS = tuple(s for s in DAG if s.stage.STAGE in ("train", "evaluate"))
BEFORE_GPU, AFTER_GPU = DAG[:DAG.index(GPU_STEPS[0])], DAG[DAG.index(GPU_STEPS[-1]) + 1:]
assert BEFORE_GPU + GPU_STEPS + AFTER_GPU == DAG, "the GPU stages must be consecutive in the DAG"


def as_task(fault: str) -> Executor:
    """A step runs as its stage's task; its reports (funnel, lengths, loss curve, verdict) become
    artifacts of this flow run, also when the task came back `Cached`."""

    def execute(step, cfg, inputs, key, rebuild) -> ArtifactRef:
        module = TASKS[step.stage.STAGE]
        token = FAULT.set(fault)
        try:
            state = getattr(module, step.stage.STAGE).with_options(task_run_name=step.name)(
                cfg, inputs, key, rebuild, return_state=True)
        finally:
            FAULT.reset(token)
        ref = state.result()  # raises the task's exception when it failed
        if report := getattr(module, "report", None):
            report(ArtifactStore(cfg.artifact_root), ref)
        return ref

    return execute


def this_attempts_fault(fail_stage: str) -> str:
    """The drill fails only the first attempt: a retry of the run (from the UI, say) goes through."""
    return fail_stage if (flow_run.get_run_count() or 1) <= 1 else "none"


@flow(name="synthtune", flow_run_name=run_name, log_prints=False, on_crashed=[give_back_gpu],
      on_cancellation=[give_back_gpu])
def pipeline(config: PipelineConfig, gpu_deployment: GpuDeployment = "", gpu_slot: GpuSlot = "",
             fail_stage: FailStage = "none", refresh: Refresh = []) -> dict[str, ArtifactRef]:  # noqa: B006
    """preflight -> generate -> filter -> template -> train -> evaluate (base, tuned, champion) -> promote.

    Ends `Completed`, or `Completed` named `NotPromoted` (reasons in its message and the
    promotion-verdict artifact) when the candidate failed the gate and the champion stays in service."""
    announce()
    follow_the_worker()
    create_markdown_artifact(f"```yaml\n{to_yaml(config)}```", key="resolved-config",
                             description=f"Resolved config of pipeline '{config.name}'")
    if deployment.get_name():  # what the model card names as the command that produced the adapter
        os.environ["SYNTHTUNE_COMMAND"] = (f"prefect deployment run '{flow_run.get_flow_name()}/{deployment.get_name()}'"
                                           f" (flow run {flow_run.get_name()})")
    fault = this_attempts_fault(fail_stage)
    execute, refs = as_task(fault), {}
    with tracked(config, owner=True), leased(ArtifactStore(config.artifact_root), config.name, str(flow_run.get_id())):
        walk(config, execute, BEFORE_GPU, refs, refresh)
        if gpu_deployment:
            refs.update(run_elsewhere(config, gpu_deployment, GPU_STEPS, refs, gpu_slot, fault, refresh))
        else:
            with hold_gpu(slot_name(gpu_slot)):
                walk(config, execute, GPU_STEPS, refs, refresh)
        walk(config, execute, AFTER_GPU, refs, refresh)
        report_cost(config, refs)  # the night's ledger: the cost-history artifacts, MLflow
    verdict = refs["promote"].summary
    if not verdict["promoted"]:  # a finished run whose adapter failed the gate: say so in the run's state
        return Completed(name="NotPromoted", message="; ".join(verdict["reasons"]), data=refs)
    return refs


@flow(name="synthtune-gpu", flow_run_name=gpu_run_name, log_prints=False, on_crashed=[give_back_gpu],
      on_cancellation=[give_back_gpu])
def gpu_stages(config: PipelineConfig, upstream: dict[str, ArtifactRef], gpu_slot: GpuSlot = "",
               fail_stage: FailStage = "none", refresh: Refresh = []) -> dict[str, ArtifactRef]:  # noqa: B006
    """train and evaluate (base, tuned, champion) on a GPU worker, for a `pipeline` run in split mode;
    the outputs are handed back through the artifact root (flows/split.py)."""
    follow_the_worker()
    refs = dict(upstream)
    with tracked(config, owner=False), leased(ArtifactStore(config.artifact_root), config.name, str(flow_run.get_id())), \
            hold_gpu(slot_name(gpu_slot)):
        walk(config, as_task(fail_stage), GPU_STEPS, refs, refresh)
    out = {s.name: refs[s.name] for s in GPU_STEPS if s.name in refs}
    hand_back(config, str(flow_run.get_id()), out)
    return out
