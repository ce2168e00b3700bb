"""`synthtune deploy`: a pipeline YAML as Prefect deployment(s) (flows/deploy.py does the work)."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.markup import escape

from synthtune.cli.common import ConfigArg, Overrides, app, console, err, fail, load


@app.command()
def deploy(
    config: ConfigArg = None,
    overrides: Overrides = None,
    name: Annotated[str, typer.Option(help="Deployment name (split mode adds NAME-gpu).")] = "",
    cron: Annotated[str | None, typer.Option(help='Schedule, e.g. "0 2 * * *". None: runs start by hand or by API.')] = None,
    timezone: Annotated[str, typer.Option(help="IANA timezone of the cron schedule.")] = "UTC",
    pool: Annotated[str, typer.Option(help="Work pool of the GPU stages (and of every stage unless --split).")] = "gpu",
    split: Annotated[bool, typer.Option(help="Data stages on --cpu-pool, train and evaluate on --pool.")] = False,
    cpu_pool: Annotated[str, typer.Option(help="Work pool of the data stages with --split.")] = "cpu",
    gpu_slot: Annotated[str, typer.Option(help="GPU slot name (default: gpu:<worker host>).")] = "",
    replace: Annotated[bool, typer.Option(help="Take over a deployment name held by another pipeline.")] = False,
) -> None:
    """Create or update the Prefect deployment(s) of a pipeline on the server at PREFECT_API_URL; the
    config becomes the deployment's parameters. Deploying again with the same arguments changes nothing."""
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("PREFECT_API_URL is not set: deploy to a running server (prefect server start; "
                    "export PREFECT_API_URL=http://HOST:4200/api)")
    cfg = load(config, overrides)
    from flows.deploy import DeployError, apply, plan

    try:
        plans = plan(cfg, name or cfg.name, cron, timezone, pool, split, cpu_pool, gpu_slot)
        ids = apply(plans, replace=replace)
    except DeployError as e:
        raise fail(str(e)) from None
    for p, deployment_id in zip(plans, ids, strict=True):
        when = f"cron '{p.cron}' ({p.timezone})" if p.cron else "no schedule"
        trigger = f", and when seeds arrive for '{p.pipeline}'" if p.pipeline else ""
        console.print(f"{p.flow}/{p.name}: pool {p.pool}, {when}{trigger}, id {deployment_id}", highlight=False)
    from synthtune.cli.registry import same_name_warning

    if warning := same_name_warning(config, overrides, cfg):
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)

