"""The registry commands: `models`, `show`, `rollback`, `gc`, and `seeds-arrived` (an event for the
nightly deployment's trigger)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from synthtune.cli.common import ConfigArg, Overrides, app, console, err, fail, load


def _registry(config: Path | None, overrides: list[str] | None):
    from synthtune.registry import Registry
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    return cfg, Registry(ArtifactStore(cfg.artifact_root))


def _score(scores: dict | None, task: str, metric: str) -> str:
    value = (scores or {}).get(task, {}).get(metric)
    return "-" if value is None else f"{value:.3f}"


@app.command()
def models(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """The registry's history: when, which candidate, its target score vs the champion's and base's,
    promoted or not, and why."""
    from synthtune.registry import RegistryError

    cfg, registry = _registry(config, overrides)
    try:
        history, champion = registry.history(), registry.champion()
    except RegistryError as e:
        raise fail(str(e)) from None
    task, metric = cfg.promote.target_task, cfg.promote.metric
    table = Table(title=f"'{cfg.name}' models ({registry.uri('history.jsonl')})")
    for col in ("when", "event", "candidate", f"{task} {metric}", "champion", "base", "promoted", "why"):
        table.add_column(col, overflow="fold")
    for e in history:
        if e.get("event") == "rollback":
            why = f"rolled back from {e.get('from_train_key')}"
        elif e.get("promoted"):
            why = "first champion (vs base)" if not e.get("champion_train_key") else f"beat {e['champion_train_key']}"
        else:
            why = next((r for r in e.get("reasons", []) if "FAILED" in r), "; ".join(e.get("reasons", [])))
        mark = " (in service)" if champion and e.get("train_key") == champion["train_key"] and e.get("promoted") else ""
        table.add_row(e.get("time", ""), e.get("event", ""), f"{e.get('train_key')}{mark}",
                      _score(e.get("scores"), task, metric), _score(e.get("champion_scores"), task, metric),
                      _score(e.get("base_scores"), task, metric), "yes" if e.get("promoted") else "no", escape(why))
    console.print(table)
    if not history:
        console.print("no decisions yet: run the pipeline (`synthtune run`)")


@app.command()
def rollback(config: ConfigArg = None, overrides: Overrides = None,
             to: Annotated[str | None, typer.Option(help="Train key of a previously promoted adapter.")] = None) -> None:
    """Put the previous promoted adapter back in service (or the one named by --to); recorded in the history."""
    from synthtune.registry import RegistryError

    cfg, registry = _registry(config, overrides)
    try:
        record = registry.rollback(to)
    except RegistryError as e:
        raise fail(f"rollback: {e}") from None
    console.print(f"champion is now {record['train_key']} ({record['adapter']}), was {record.get('rolled_back_from')}",
                  highlight=False)
    if cfg.tracking.mlflow_uri:  # the registered model's @champion follows
        from synthtune import tracking

        try:
            version = tracking.mirror_champion(tracking.client_for(cfg.tracking.mlflow_uri), tracking.registered_name(cfg),
                                               record["train_key"])
            console.print(f"MLflow: {tracking.registered_name(cfg)}@champion -> version {version}", highlight=False)
        except Exception as e:  # the artifact root's registry is the truth; MLflow only mirrors it
            err.print(f"[yellow]warning:[/yellow] MLflow alias not moved: {escape(str(e))}", highlight=False)
    _emit("synthtune.model.rolled_back", cfg.name, {"train_key": record["train_key"],
                                                    "from_train_key": record.get("rolled_back_from")})


@app.command()
def show(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """The champion's card: base model, data keys, scores, config, and where the adapter is."""
    import yaml

    from synthtune.registry import RegistryError

    cfg, registry = _registry(config, overrides)
    try:
        record = registry.champion()
    except RegistryError as e:
        raise fail(str(e)) from None
    if record is None:
        raise fail(f"no champion yet in {registry.uri('champion.json')}: run the pipeline until one is promoted", 1)
    table = Table(title=f"'{cfg.name}' champion", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name in ("train_key", "student", "adapter", "promoted_at", "run_id", "config_sha256"):
        table.add_row(name, str(record.get(name)))
    table.add_row("data keys", ", ".join(f"{k} {v}" for k, v in (record.get("data_keys") or {}).items()))
    for label, scores in (("scores", record.get("scores")), ("base scores", record.get("base_scores"))):
        table.add_row(label, "; ".join(f"{t} " + ", ".join(f"{m} {v:.3f}" for m, v in ms.items() if "stderr" not in m)
                                       for t, ms in (scores or {}).items()))
    console.print(table)
    console.print(f"serve it: vllm serve {record.get('student')} --enable-lora --lora-modules "
                  f"{cfg.name}={record.get('adapter')}", highlight=False)
    if record.get("config"):
        console.print(yaml.safe_dump(record["config"], sort_keys=False), highlight=False)


@app.command()
def gc(config: ConfigArg = None, overrides: Overrides = None,
       keep: Annotated[int, typer.Option(help="Promoted adapters kept besides the champion.", min=0)] = 3,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; delete nothing.")] = False) -> None:
    """Delete old candidate adapters, checkpoints and stage outputs outside the retention policy."""
    from synthtune.registry import RegistryError
    from synthtune.retention import apply_gc, plan_gc
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    store = ArtifactStore(cfg.artifact_root)
    try:
        plan = plan_gc(store, keep)
    except RegistryError as e:
        raise fail(f"gc refuses to guess what is in use: {e}") from None
    table = Table(title=f"{'would delete' if dry_run else 'deleting'} {len(plan.delete)} item(s), "
                        f"{plan.bytes / 2**20:.1f} MiB, under {cfg.artifact_root}")
    for col in ("path", "MiB", "why"):
        table.add_column(col, overflow="fold")
    for path, why, size in plan.delete:
        table.add_row(path, f"{size / 2**20:.1f}", why)
    console.print(table)
    console.print(f"kept {len(plan.keep)} output(s): " + "; ".join(sorted({w for w in plan.keep.values()})),
                  highlight=False)
    if not dry_run:
        apply_gc(store, plan)


@app.command("seeds-arrived")
def seeds_arrived(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """Tell the Prefect server at $PREFECT_API_URL that new seeds landed (event `synthtune.seeds.arrived`):
    the nightly deployment's trigger starts one run for a burst of them."""
    cfg = load(config, overrides)
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("seeds-arrived: PREFECT_API_URL is not set; it tells a running Prefect server, whose nightly "
                    "deployment reacts to it")
    _emit("synthtune.seeds.arrived", cfg.name, {"seeds": cfg.generate.seeds})
    console.print(f"emitted synthtune.seeds.arrived for pipeline '{cfg.name}'", highlight=False)


def _emit(event: str, pipeline: str, payload: dict) -> None:
    """A Prefect event, sent to the server at PREFECT_API_URL and accepted there (tasks/events.py)."""
    if not os.environ.get("PREFECT_API_URL"):
        console.print(f"(no PREFECT_API_URL: {event} not emitted)", highlight=False)
        return
    from tasks.events import post

    post(event, pipeline, payload)

