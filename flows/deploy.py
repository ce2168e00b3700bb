"""`synthtune deploy`: a pipeline YAML as Prefect deployment(s) on the server at PREFECT_API_URL.

It goes through Prefect's own API (`create_deployment`, which creates or updates by flow and name,
so deploying twice changes nothing), with what `prefect deploy --prefect-file deployments/prefect.yaml`
would record: the flow's entrypoint, its parameter schema (the UI's form), a pull step into the
worker's checkout (`$SYNTHTUNE_HOME`), and the config as the `config` parameter, its paths made
relative to the checkout so every worker finds them in its own.

Everything is checked before anything is created: the config, the pools, the cron expression and the
timezone; a shared artifact root (an absolute folder or a URL), which the workers must all see; and
that the name is not taken by a deployment of another pipeline (`--replace` to take it anyway).

A scheduled deployment also starts when seeds land: it gets the trigger on its own pipeline's
`synthtune.seeds.arrived` event (`synthtune seeds-arrived CONFIG`), debounced: the first event of a
burst schedules one run `SEEDS_DEBOUNCE_S` later, and the events within that window start nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: workers run flows from theirs ($SYNTHTUNE_HOME)

ENTRYPOINT = "flows/pipeline.py:pipeline"
GPU_ENTRYPOINT = "flows/pipeline.py:gpu_stages"
PULL = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SYNTHTUNE_HOME }}"}}]
SEEDS_DEBOUNCE_S = 600


class DeployError(ValueError):
    """Bad input for a deployment; nothing was created."""


@dataclass(frozen=True)
class Plan:
    name: str
    flow: str
    entrypoint: str
    pool: str
    parameters: dict
    cron: str | None
    timezone: str
    tags: list[str]
    description: str
    pipeline: str = ""  # the pipeline whose seeds-arrived event starts it (scheduled deployments)


def portable(value, root: Path = ROOT):
    """The config's absolute paths inside the checkout, made relative to it (workers run in theirs)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and value.startswith(f"{root}/"):
        rel = value[len(str(root)) + 1:]
        return rel + ("/" if value.endswith("/") and not rel.endswith("/") else "")
    return value


def plan(cfg, name: str, cron: str | None, timezone: str, pool: str, split: bool, cpu_pool: str,
         gpu_slot: str = "") -> list[Plan]:
    """The deployments to create, checked without the server: names, cron, timezone, artifact root."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.client.schemas.schedules import CronSchedule

    from synthtune.store import ArtifactStore

    if not name or "/" in name or "%" in name:
        raise DeployError(f"--name '{name}': a deployment name, without '/' or '%'")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise DeployError(f"--timezone '{timezone}': not an IANA timezone (e.g. Europe/Berlin, UTC)") from None
    if cron:
        try:
            CronSchedule(cron=cron, timezone=timezone)
        except ValueError as e:
            why = e.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(e, "errors") else str(e)
            raise DeployError(f"--cron '{cron}': not a cron expression ({why})") from None
    store = ArtifactStore(cfg.artifact_root)
    if store.local and (not Path(store.root).is_absolute() or Path(store.root).is_relative_to(ROOT)):
        raise DeployError(f"artifact_root '{cfg.artifact_root}' is this checkout's own folder: each worker would use "
                          "the one in its own checkout, and a retry on another machine would find nothing. Use a folder "
                          "every worker sees (artifact_root=/shared/synthtune), or a URL (artifact_root=s3://...)")
    config = {**portable(cfg.model_dump(mode="json")), "artifact_root": cfg.artifact_root}
    scheduled = " every night" if cron else ""
    tags = ["synthtune", cfg.name] + (["nightly"] if cron else ["adhoc"])
    if not split:
        return [Plan(name, "synthtune", ENTRYPOINT, pool, {"config": config, "gpu_slot": gpu_slot}, cron, timezone,
                     tags, f"Pipeline '{cfg.name}'{scheduled}: every stage on pool {pool}.", cfg.name if cron else "")]
    gpu_name = f"{name}-gpu"
    return [
        Plan(name, "synthtune", ENTRYPOINT, cpu_pool,
             {"config": config, "gpu_deployment": f"synthtune-gpu/{gpu_name}", "gpu_slot": gpu_slot}, cron, timezone,
             [*tags, "split"], f"Pipeline '{cfg.name}'{scheduled}: data stages on pool {cpu_pool}, train and "
                               f"evaluate on pool {pool} (synthtune-gpu/{gpu_name}).", cfg.name if cron else ""),
        Plan(gpu_name, "synthtune-gpu", GPU_ENTRYPOINT, pool, {}, None, timezone, ["synthtune", cfg.name, "split"],
             f"train and evaluate for '{name}' (started by its runs, not by hand)."),
    ]


def seeds_trigger(pipeline: str):
    """Start the deployment when `synthtune.seeds.arrived` comes for `pipeline`, a burst debounced into one run."""
    from datetime import timedelta

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"synthtune: seeds arrived for {pipeline}", enabled=True,
        match={"prefect.resource.id": f"synthtune.pipeline.{pipeline}"}, expect={"synthtune.seeds.arrived"},
        posture="Reactive", threshold=1, within=timedelta(seconds=SEEDS_DEBOUNCE_S),
        schedule_after=timedelta(seconds=SEEDS_DEBOUNCE_S))


def owner(deployment) -> str | None:
    """The pipeline an existing deployment runs (its config parameter's name)."""
    config = (deployment.parameters or {}).get("config")
    return config.get("name") if isinstance(config, dict) else None


def apply(plans: list[Plan], replace: bool = False) -> list[str]:
    """Create or update each deployment (an update replaces its schedules with the ones asked for);
    returns their ids. Unknown pools, and names held by a deployment of another pipeline (unless
    `replace`), are refused before anything is created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import gpu_stages, pipeline

    flows = {"synthtune": pipeline, "synthtune-gpu": gpu_stages}
    with get_client(sync_client=True) as client:
        known = {p.name for p in client.read_work_pools()}
        for p in plans:
            if p.pool not in known:
                raise DeployError(f"work pool '{p.pool}' does not exist on {client.api_url} (pools: "
                                  f"{', '.join(sorted(known)) or 'none'}); create it first, e.g. prefect work-pool "
                                  f"create {p.pool} --type process")
            if p.flow != "synthtune" or replace:
                continue
            try:
                existing = client.read_deployment_by_name(f"{p.flow}/{p.name}")
            except ObjectNotFound:
                continue
            mine = p.parameters["config"]["name"]
            if owner(existing) not in (None, mine):
                raise DeployError(f"deployment {p.flow}/{p.name} runs pipeline '{owner(existing)}': deploying pipeline "
                                  f"'{mine}' under that name would replace it, its schedule and its concurrency limit. "
                                  f"Choose another --name (the default is the pipeline's name), or --replace")
        ids = []
        for p in plans:
            schedules = [DeploymentScheduleCreate(schedule=CronSchedule(cron=p.cron, timezone=p.timezone), active=True)
                         ] if p.cron else []
            ids.append(str(client.create_deployment(
                flow_id=client.create_flow_from_name(p.flow), name=p.name, entrypoint=p.entrypoint,
                work_pool_name=p.pool, work_queue_name="default", parameters=p.parameters, tags=p.tags,
                description=p.description, pull_steps=PULL, schedules=schedules, enforce_parameter_schema=True,
                parameter_openapi_schema=parameter_schema(flows[p.flow]).model_dump_for_openapi(),
                # a scheduled run never overlaps the previous one: a late one waits its turn
                concurrency_limit=1 if p.cron else None,
                concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
                if p.cron else None)))
            client.delete_resource_owned_automations(f"prefect.deployment.{ids[-1]}")  # ours: recreated below
            if p.pipeline:
                trigger = seeds_trigger(p.pipeline)
                trigger.set_deployment_id(ids[-1])
                client.create_automation(trigger.as_automation())
    return ids
