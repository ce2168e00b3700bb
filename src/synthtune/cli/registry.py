"""The registry commands: `models`, `show`, `rollback`, `gc`, and `seeds-arrived` (an event for the
nightly deployment's trigger). Each works on one pipeline's registry (the config's `name`) on its
artifact root; `models` without a config lists the pipelines on a root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from synthtune.cli.common import ConfigArg, Overrides, app, config_path, console, err, fail, load


def _registry(config: Path | None, overrides: list[str] | None):
    from synthtune.registry import Registry, RegistryError
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    try:
        return cfg, Registry(ArtifactStore(cfg.artifact_root), cfg.name)
    except RegistryError as e:  # a flat registry that cannot be migrated
        raise fail(str(e)) from None


def _champion(registry, what_to_do: str) -> dict:
    """The champion's record, or exit naming the registry problem, or that there is none yet and what to do."""
    from synthtune.registry import RegistryError

    try:
        record = registry.champion()
    except RegistryError as e:
        raise fail(str(e)) from None
    if record is None:
        raise fail(f"no champion yet in {registry.uri('champion.json')}: {what_to_do}", 1)
    return record


def _score(scores: dict | None, task: str, metric: str) -> str:
    value = (scores or {}).get(task, {}).get(metric)
    return "-" if value is None else f"{value:.3f}"


def _pipelines(root: str) -> None:
    """Every pipeline with a registry on `root`: its champion, when, and how many decisions."""
    from synthtune.registry import Registry, RegistryError, pipelines
    from synthtune.store import ArtifactStore

    store = ArtifactStore(root)
    table = Table(title=f"pipelines on {store.uri()}")
    for col in ("pipeline", "champion", "since", "decisions", "promotions", "last decision"):
        table.add_column(col, overflow="fold")
    names = pipelines(store)
    for name in names:
        registry = Registry(store, name)
        try:
            history, champion = registry.history(), registry.champion()
        except RegistryError as e:
            table.add_row(name, f"[red]{escape(str(e))}[/red]", "", "", "", "")
            continue
        decisions = [e for e in history if e.get("event") == "decision"]
        table.add_row(name, champion["train_key"] if champion else "-", champion["promoted_at"] if champion else "-",
                      str(len(decisions)), str(sum(bool(e.get("promoted")) for e in decisions)),
                      decisions[-1].get("time", "") if decisions else "-")
    console.print(table)
    if not names:
        console.print("no pipeline has a registry here yet: run one (`synthtune run CONFIG`)")


def _lineage(store, train_key: str) -> str:
    """'k3 <- k2 <- k1 <- base' with each adapter's rows (new + replayed for a continued night)."""
    from synthtune import lineage

    links = lineage.chain(store, train_key)
    parts = []
    for link in links:
        rows = link.get("rows") or {}
        continued = link.get("init", "base") != "base"
        what = "gone (gc)" if link.get("gone") else (f"{rows.get('new')} new + {rows.get('replay')} replayed"
                                                      if continued else f"{rows.get('trained', rows.get('train'))} rows")
        parts.append(f"{link['key']} ({what})")
    return " <- ".join([*parts, *([] if links and links[-1].get("gone") else ["base"])])


def _start(store, train_key: str | None) -> str:
    """Where a candidate's training started: base, or the adapter it continued."""
    manifest = store.manifest("train", train_key) if train_key else None
    init = (manifest or {}).get("init", "base")
    return "base" if manifest is None or init == "base" else f"continues {init}"


@app.command()
def models(config: ConfigArg = None, overrides: Overrides = None,
           root: Annotated[str | None, typer.Option(help="List the pipelines on this artifact root (any fsspec URL).")]
           = None) -> None:
    """A pipeline's registry history: when, which candidate, its target score vs the champion's and base's,
    promoted or not, and why. Without a config (or with --root): the pipelines on the root."""
    from synthtune.registry import RegistryError

    if root or (config is None and not overrides):
        _pipelines(root or load(config, overrides).artifact_root)
        return
    cfg, registry = _registry(config, overrides)
    try:
        history, champion = registry.history(), registry.champion()
    except RegistryError as e:
        raise fail(str(e)) from None
    task, metric = cfg.promote.target_task, cfg.promote.metric
    table = Table(title=f"'{cfg.name}' models ({registry.uri('history.jsonl')})")
    # the gate's forgetting and per-slice figures, where a decision measured them
    from synthtune.ledger import by_train_key

    costs = by_train_key(registry.store, cfg.name)  # the night that trained each candidate (synthtune cost)
    extra = [name for name, has in (("forgetting", any(e.get("forgetting") for e in history)),
                                    ("worst slice", any(e.get("worst_slice") for e in history)),
                                    ("cost", any(e.get("train_key") in costs for e in history))) if has]
    for col in ("when", "event", "candidate", "start", f"{task} {metric}", "champion", "base", *extra, "promoted",
                "why"):
        table.add_column(col, overflow="fold")
    for e in history:
        if e.get("event") == "rollback":
            why = f"rolled back from {e.get('from_train_key')}"
        elif e.get("promoted"):
            why = "first champion (vs base)" if not e.get("champion_train_key") else f"beat {e['champion_train_key']}"
        else:
            why = next((r for r in e.get("reasons", []) if "FAILED" in r), "; ".join(e.get("reasons", [])))
        mark = " (in service)" if champion and e.get("id") == champion.get("event_id") else ""
        table.add_row(e.get("time", ""), e.get("event", ""), f"{e.get('train_key')}{mark}",
                      _start(registry.store, e.get("train_key")), _score(e.get("scores"), task, metric),
                      _score(e.get("champion_scores"), task, metric),
                      _score(e.get("base_scores"), task, metric),
                      *[{"forgetting": _forgetting, "worst slice": _worst_slice,
                         "cost": lambda e: _cost(costs.get(e.get("train_key")))}[c](e) for c in extra],
                      "yes" if e.get("promoted") else "no", escape(why))
    console.print(table)
    if not history:
        console.print("no decisions yet: run the pipeline (`synthtune run`)")


def _forgetting(event: dict) -> str:
    """The general-text loss's rise over base, as the gate saw it ('-' when not measured)."""
    f = event.get("forgetting") or {}
    return "-" if f.get("rise") is None else f"{f['rise']:+.1%} ({f['tuned']:.3f})"


def _cost(night: dict | None) -> str:
    """What the night that trained a candidate cost (and per point gained, when it was promoted)."""
    from synthtune.ledger import money

    if night is None:
        return "-"
    if not night["priced"]:
        return f"not priced ({sum(night['requests'].values())} requests)"
    per_point = f", {money(night['usd_per_point'])}/pt" if night.get("usd_per_point") is not None else ""
    return f"{money(night['usd'])}{per_point}"


def _worst_slice(event: dict) -> str:
    s = event.get("worst_slice")
    return "-" if not s else escape(f"{s['task']}/{s['slice']} {s['delta']:+.3f} (p {s['p_holm']:.2g})")


@app.command()
def rollback(config: ConfigArg = None, overrides: Overrides = None,
             to: Annotated[str | None, typer.Option(help="Train key of a previously promoted adapter.")] = None) -> None:
    """Put the previous promoted adapter back in service (or the one named by --to); recorded in the history.
    The adapter must be intact (its files matching its manifest)."""
    from synthtune.registry import RegistryError

    cfg, registry = _registry(config, overrides)
    try:
        record = registry.rollback(to)
    except RegistryError as e:
        raise fail(f"rollback: {e}") from None
    console.print(f"champion of '{cfg.name}' is now {record['train_key']} ({registry.adapter_uri(record)}), was "
                  f"{record.get('rolled_back_from')}", highlight=False)
    if cfg.tracking.mlflow_uri:  # the registered model's @champion follows
        from synthtune import tracking

        try:
            version = tracking.mirror_champion(tracking.client_for(cfg.tracking.mlflow_uri), tracking.registered_name(cfg),
                                               record["train_key"])
            console.print(f"MLflow: {tracking.registered_name(cfg)}@champion -> version {version}", highlight=False)
        except Exception as e:  # the artifact root's registry is the truth; MLflow only mirrors it
            err.print(f"[yellow]warning:[/yellow] MLflow alias not moved: {escape(str(e))}", highlight=False)
    try:
        _emit("synthtune.model.rolled_back", cfg.name, {"train_key": record["train_key"],
                                                        "from_train_key": record.get("rolled_back_from")})
    except RuntimeError as e:  # the rollback itself is recorded; only the notification is lost
        err.print(f"[yellow]warning:[/yellow] {escape(str(e))}", highlight=False)


@app.command()
def show(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """The champion's card: base model, data keys, scores, config, and where the adapter is (it must be
    intact: its files matching its manifest)."""
    import yaml


    cfg, registry = _registry(config, overrides)
    record = _champion(registry, "run the pipeline until one is promoted")
    bad = registry.store.problems("train", record["train_key"])
    if bad:
        raise fail(f"the champion {record['train_key']} is damaged: {'; '.join(bad[:3])}. Do not serve it: restore it, "
                   "or `synthtune rollback --to TRAIN_KEY`", 1)
    adapter = registry.adapter_uri(record)
    table = Table(title=f"'{cfg.name}' champion", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name, value in (("train_key", record.get("train_key")), ("student", record.get("student")), ("adapter", adapter),
                        ("promoted_at", record.get("promoted_at")), ("run_id", record.get("run_id")),
                        ("config_sha256", record.get("config_sha256"))):
        table.add_row(name, str(value))
    table.add_row("data keys", ", ".join(f"{k} {v}" for k, v in (record.get("data_keys") or {}).items()))
    table.add_row("lineage", _lineage(registry.store, record["train_key"]))
    for label, scores in (("scores", record.get("scores")), ("base scores", record.get("base_scores"))):
        table.add_row(label, "; ".join(f"{t} " + ", ".join(f"{m} {v:.3f}" for m, v in ms.items() if "stderr" not in m)
                                       for t, ms in (scores or {}).items()))
    console.print(table)
    console.print(f"serve it: vllm serve {record.get('student')} --enable-lora --lora-modules {cfg.name}={adapter}",
                  highlight=False)
    if record.get("config"):
        console.print(yaml.safe_dump(record["config"], sort_keys=False), highlight=False)


@app.command()
def gc(config: ConfigArg = None, overrides: Overrides = None,
       keep: Annotated[int, typer.Option(help="Promoted adapters kept besides the champion.", min=0)] = 3,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; delete nothing.")] = False) -> None:
    """Delete this pipeline's old candidate adapters, checkpoints of decided nights and stage outputs outside
    the retention policy. Never what another pipeline references, what a run in flight uses, or a champion."""
    from synthtune.registry import RegistryError
    from synthtune.retention import collect
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    store = ArtifactStore(cfg.artifact_root)

    def listing(plan) -> None:
        table = Table(title=f"{'would delete' if dry_run else 'deleting'} {len(plan.delete)} item(s), "
                            f"{plan.bytes / 2**20:.1f} MiB, of pipeline '{cfg.name}' under {store.uri()}")
        for col in ("path", "MiB", "why"):
            table.add_column(col, overflow="fold")
        for path, why, size in plan.delete:
            table.add_row(path, f"{size / 2**20:.1f}", why)
        console.print(table)
        console.print(f"kept {len(plan.keep)} item(s): " + "; ".join(sorted({w for w in plan.keep.values()})),
                      highlight=False)

    try:
        plan = collect(store, cfg.name, keep, dry_run=dry_run, on_planned=listing)
    except RegistryError as e:
        raise fail(f"gc refuses to guess what is in use: {e}") from None
    if plan.skipped:
        console.print(f"left {len(plan.skipped)} output(s) a run started using meanwhile: {', '.join(plan.skipped)}",
                      highlight=False)


@app.command("seeds-arrived")
def seeds_arrived(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """Tell the Prefect server at $PREFECT_API_URL that new seeds landed (event `synthtune.seeds.arrived` for
    this pipeline): its scheduled deployment's trigger starts one run for a burst of them. Exit 1 when the
    server does not accept the event."""
    cfg = load(config, overrides)
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("seeds-arrived: PREFECT_API_URL is not set; it tells a running Prefect server, whose nightly "
                   "deployment reacts to it")
    try:
        _emit("synthtune.seeds.arrived", cfg.name, {"seeds": cfg.generate.seeds})
    except RuntimeError as e:
        raise fail(f"seeds-arrived: {e}", 1) from None
    console.print(f"the server took synthtune.seeds.arrived for pipeline '{cfg.name}'", highlight=False)


def _emit(event: str, pipeline: str, payload: dict) -> None:
    """A Prefect event, sent to the server at PREFECT_API_URL and accepted there (tasks/events.py)."""
    if not os.environ.get("PREFECT_API_URL"):
        console.print(f"(no PREFECT_API_URL: {event} not emitted)", highlight=False)
        return
    from tasks.events import post

    post(event, pipeline, payload)


def same_name_warning(config: Path | None, overrides: list[str] | None, cfg) -> str | None:
    """Two config files with one pipeline name on one root share its registry and champion: the warning
    naming both, when this config file is not the one the pipeline last ran from."""
    from synthtune.registry import Registry
    from synthtune.store import ArtifactStore

    path = str(config_path(config, overrides)[0].resolve())
    before = Registry(ArtifactStore(cfg.artifact_root), cfg.name).record_source(path)
    if before is None:
        return None
    return (f"pipeline '{cfg.name}' on {cfg.artifact_root} last ran from {before}; this run is from {path}. Two configs "
            f"with one name share one registry and one champion: rename one (`name:`) unless they are the same "
            "pipeline moved")


@app.command()
def chat(config: ConfigArg = None, overrides: Overrides = None,
         adapter: Annotated[str, typer.Option(help="`champion` (the adapter in service) or a train key.")] = "champion",
         prompt: Annotated[list[str] | None, typer.Option(
             help="Answer this and exit (repeatable). Without it: one question per line until an empty line or EOF.")]
         = None,
         max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 128) -> None:
    """A first look at the result: base + adapter, prompted with the chat template saved with the adapter
    (the one it was trained and evaluated with) and template.system_prompt, greedy."""
    import sys

    from synthtune import serving

    cfg, registry = _registry(config, overrides)
    key = _champion(registry, "run the pipeline, or pass --adapter KEY")["train_key"] if adapter == "champion" else adapter
    ref = registry.store.ref("train", key)
    if ref is None or (bad := registry.store.problems("train", key)):
        why = "; ".join(bad[:3]) if ref is not None else "no finished train output with that key"
        raise fail(f"chat: adapter {key}: {why}", 1)
    interactive = not prompt
    if interactive:
        err.print(f"[dim]{cfg.name}: {cfg.student} + adapter {key}. One question per line; an empty line ends.[/dim]",
                  highlight=False)

    def questions():
        yield from prompt or []
        while interactive:
            line = sys.stdin.readline()
            if not line.strip():
                return
            yield line.strip()

    with registry.store.local_copy(ref) as folder:
        for question, reply in serving.answer(cfg.student, cfg.student_revision, folder / "adapter", questions(),
                                              max_new_tokens, cfg.template.system_prompt):
            console.print(f"[bold]> {escape(question)}[/bold]\n{escape(reply)}", highlight=False)
