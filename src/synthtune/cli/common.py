"""What every command shares: the Typer app, the consoles, and how a command finds and loads its config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Nightly post-training as cached, retryable stages.")
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, soft_wrap=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides like train.lora.r=8 (values parsed as YAML).")]
ConfigArg = Annotated[Path | None, typer.Argument(help="Pipeline YAML (default: configs/demo.yaml).")]
OverBudget = Annotated[bool, typer.Option("--allow-over-budget", help="Go on although tonight's teacher requests are "
                                          "over cost.max_teacher_requests / max_teacher_usd (cost.allow_over_budget).")]


def project_root() -> Path:
    """The checkout that holds configs/ (the demo's config and data): the working directory, else the
    checkout this package is installed from."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (candidate / "configs" / "demo.yaml").is_file():
            return candidate
    raise typer.BadParameter("cannot find configs/demo.yaml: name a pipeline YAML, or run from the project checkout")


def config_path(config: Path | None, overrides: list[str] | None) -> tuple[Path, list[str]]:
    """The config a command reads (the demo's when none is given: `synthtune run a.b=1`) and the overrides."""
    if config is not None and "=" in str(config) and not config.exists():
        config, overrides = None, [str(config), *(overrides or [])]
    return config or project_root() / "configs" / "demo.yaml", list(overrides or [])


def load(config: Path | None, overrides: list[str] | None):
    """The validated config, or exit 2 with every problem named."""
    from synthtune.config import ConfigError, load_config

    path, overrides = config_path(config, overrides)
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        err.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2) from None


def over_budget(cfg, allow: bool):
    """The config with cost.allow_over_budget set when `--allow-over-budget` was given."""
    return cfg.model_copy(update={"cost": cfg.cost.model_copy(update={"allow_over_budget": True})}) if allow else cfg


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` in red on stderr; the Exit to raise."""
    err.print(f"[red]{escape(message)}[/red]", highlight=False)
    return typer.Exit(code)
