"""One command per stage (upstream reused from the artifact store, or run first), `template --show`,
`tiny-model` and `--version`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from synthtune import STAGES
from synthtune.cli.common import ConfigArg, OverBudget, Overrides, app, console, load, over_budget


def _stage_command(stage: str):
    def command(config: ConfigArg = None, overrides: Overrides = None, allow_over_budget: OverBudget = False) -> None:
        from synthtune.runner import run_all

        cfg = over_budget(load(config, overrides), allow_over_budget)
        refs = run_all(cfg, until=stage,
                       on_step=lambda name, ref: console.print(f"[green]done[/green] {name} {ref.key} {ref.uri}"))
        console.print({k: v.summary for k, v in refs.items() if k.startswith(stage)})

    command.__doc__ = f"Run the {stage} stage alone (upstream stages reused from the artifact store, or run first)."
    return command


for _stage in STAGES:
    if _stage != "template":
        app.command(name=_stage)(_stage_command(_stage))


@app.command("template")
def template_command(
    config: ConfigArg = None, overrides: Overrides = None,
    show: Annotated[int, typer.Option(help="Print this many templated rows, trained tokens highlighted.", min=0)] = 0,
) -> None:
    """Run the template stage alone (upstream reused or run first); with --show N, print N templated rows with
    the trained tokens highlighted, the template's quirks and the length report, before any GPU time."""
    from synthtune.runner import run_all
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    refs = run_all(cfg, until="template",
                   on_step=lambda name, ref: console.print(f"[green]done[/green] {name} {ref.key} {ref.uri}"))
    ref = refs["template"]
    if not show:
        console.print(ref.summary)
        return
    from synthtune.stages.template import preview
    from synthtune.terminal import print_preview

    store = ArtifactStore(cfg.artifact_root)
    with store.local_copy(ref) as folder:
        rows = preview(cfg, folder, show)
    print_preview(console, rows, store.manifest("template", ref.key)["report"], sys.stdout.isatty())


@app.command("tiny-model")
def tiny_model(
    name: Annotated[str, typer.Argument(help="student (random, knows the words) or teacher (knows the demo facts).")],
    out: Annotated[Path | None, typer.Option(help="Folder to write; default: the tiny-model cache.")] = None,
) -> None:
    """Build a tiny Llama-style model and BPE tokenizer locally, deterministically, offline."""
    from synthtune import tiny

    path = tiny.build(name, out) if out else tiny.ensure(name)
    console.print(f"tiny:{name} at {path}")


def _version(value: bool) -> None:
    if value:
        from synthtune import __version__

        console.print(f"synthtune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Nightly post-training as cached, retryable stages."""

