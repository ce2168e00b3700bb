"""The `synthtune` command: run the loop, validate a config, run one stage, build tiny models.

Run as: synthtune run                      (the demo: configs/demo.yaml on the embedded Prefect)
        synthtune run CONFIG a.b.c=value   (any pipeline, with overrides)
        synthtune validate CONFIG          (every field and referenced file, before any GPU time)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from synthtune import STAGES

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Nightly post-training as cached, retryable stages.")
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides like train.lora.r=8 (values parsed as YAML).")]
ConfigArg = Annotated[Path | None, typer.Argument(help="Pipeline YAML (default: configs/demo.yaml).")]


def project_root() -> Path:
    """The checkout that holds flows/ and configs/: the working directory, else this package's repo."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "flows" / "pipeline.py").is_file():
            return candidate
    raise typer.BadParameter("cannot find flows/pipeline.py: run synthtune from the project checkout")


def _load(config: Path | None, overrides: list[str] | None):
    from synthtune.config import ConfigError, load_config

    if config is not None and "=" in str(config) and not config.exists():
        config, overrides = None, [str(config), *(overrides or [])]  # `synthtune run a.b=1`: overrides only
    path = config or project_root() / "configs" / "demo.yaml"
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        err.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="Pipeline YAML.")], overrides: Overrides = None) -> None:
    """Check every field, range and referenced file (seeds, task YAMLs and their data). Exit 2 on error."""
    from synthtune.eval_tasks import check_tasks

    cfg = _load(config, overrides)
    problems = check_tasks(cfg.evaluate.tasks, cfg.evaluate.task_dir)
    if problems:
        err.print(f"[red]{config}: {len(problems)} problem(s)[/red]")
        for p in problems:
            err.print(f"  {p}", highlight=False)
        raise typer.Exit(2)
    console.print(f"[green]{config}: ok[/green] (pipeline '{cfg.name}', artifacts at {cfg.artifact_root})")


@app.command()
def run(
    config: ConfigArg = None,
    overrides: Overrides = None,
    engine: Annotated[str, typer.Option(help="`prefect` (embedded unless PREFECT_API_URL is set) or `local`")] = "prefect",
) -> None:
    """Run the whole loop; finished stages are skipped (Prefect: `Cached`)."""
    cfg = _load(config, overrides)
    start = time.perf_counter()
    if engine == "prefect":
        refs = _load_flow()(cfg)
    elif engine == "local":
        from synthtune.runner import run_all

        refs = run_all(cfg, on_step=lambda name, ref: console.print(f"[green]done[/green] {name} {ref.key}"))
    else:
        raise typer.BadParameter(f"--engine must be prefect or local, not {engine}")
    print_summary(cfg, refs, time.perf_counter() - start)


def _load_flow():
    path = project_root() / "flows" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("flows.pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["flows.pipeline"] = module
    spec.loader.exec_module(module)
    return module.pipeline


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_summary(cfg, refs: dict, seconds: float) -> None:
    """Rows per stage, train loss, base vs tuned scores, where the artifacts are."""
    table = Table(title=f"synthtune '{cfg.name}' in {seconds:.0f} s")
    for col in ("step", "key", "rows", "result"):
        table.add_column(col, overflow="fold")
    for name, ref in refs.items():
        s = ref.summary
        rows = ", ".join(f"{k} {v}" for k, v in s.get("rows", {}).items())
        result = ""
        if name == "generate":
            r = s.get("rows", {})
            rows = (f"seeds {r.get('seeds')}, rows {r.get('output')} (new {r.get('new')}), quarantined "
                    f"{r.get('quarantined')}")
            result = f"answers: {r.get('reused')} reused, {r.get('generated')} generated"
        elif name == "train":
            result = (f"loss {_fmt(s.get('first_loss'))} -> {_fmt(s.get('last_loss'))} in {s.get('steps')} steps "
                      f"({s.get('quantization')}, {s.get('tokens_per_s')} tok/s)")
        elif name.startswith("evaluate"):
            result = "; ".join(f"{t} " + ", ".join(f"{m} {_fmt(v)}" for m, v in ms.items() if not m.endswith("stderr"))
                               for t, ms in s.get("scores", {}).items())
        elif name == "promote":
            result = ("PROMOTED: " if s.get("promoted") else "NOT promoted: ") + "; ".join(s.get("reasons", []))
        elif name == "template":
            result = f"trained-token share {s.get('trained_token_share')}, p99 {s.get('p99_tokens')} tokens"
        table.add_row(escape(name), ref.key, rows, escape(result))
    console.print(table)
    root = refs["promote"].uri.rsplit("/promote/", 1)[0] if "promote" in refs else cfg.artifact_root
    console.print(f"artifacts: {root}  (latest pointer: {root}/latest.json)", highlight=False)


def _stage_command(stage: str):
    def command(config: ConfigArg = None, overrides: Overrides = None) -> None:
        from synthtune.runner import run_all

        cfg = _load(config, overrides)
        refs = run_all(cfg, until=stage,
                       on_step=lambda name, ref: console.print(f"[green]done[/green] {name} {ref.key} {ref.uri}"))
        console.print({k: v.summary for k, v in refs.items() if k.startswith(stage)})

    command.__doc__ = f"Run the {stage} stage alone (upstream stages reused from the artifact store, or run first)."
    return command


for _stage in STAGES:
    app.command(name=_stage)(_stage_command(_stage))


@app.command("tiny-model")
def tiny_model(
    name: Annotated[str, typer.Argument(help="student (random, knows the words) or teacher (knows the demo facts).")],
    out: Annotated[Path | None, typer.Option(help="Folder to write; default: the tiny-model cache.")] = None,
) -> None:
    """Build a tiny Llama-style model and BPE tokenizer locally, deterministically, offline."""
    from synthtune import tiny

    path = tiny.build(name, out) if out else tiny.ensure(name)
    console.print(f"tiny:{name} at {path}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
