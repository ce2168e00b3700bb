"""`synthtune run`, `validate`, `verify` and `init`: the loop, and the checks around it."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from synthtune.cli.common import (
    ConfigArg,
    OverBudget,
    Overrides,
    app,
    config_path,
    console,
    err,
    fail,
    load,
    over_budget,
    project_root,
)


@app.command()
def validate(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """Check every field, range and referenced file (seeds, task YAMLs and their data, the metric the
    gate compares) without loading a model. Exit 2 on error; warnings do not fail it."""
    from synthtune.eval_tasks import offline_warnings
    from synthtune.seeds import SeedError
    from synthtune.stages.generate import load_seeds
    from synthtune.stages.preflight import registry_problems, task_problems
    from synthtune.store import ArtifactStore
    from synthtune.teacher import endpoint_problems
    from synthtune.tiny import teacher_warning

    path = config_path(config, overrides)[0]
    cfg = load(config, overrides)
    problems, notes = task_problems(cfg), []
    registry_errors, registry_warnings = registry_problems(cfg, ArtifactStore(cfg.artifact_root))
    problems += registry_errors
    if cfg.generate.mode != "magpie" and cfg.generate.seeds:
        try:
            seeds = load_seeds(cfg.generate)  # streamed, file by file
        except SeedError as e:
            problems.append(f"generate.seeds: {e}")
        else:
            q = seeds.quarantined
            first = f" (first: {q[0]['file']}:{q[0]['line']}: {q[0]['reason']})" if q else ""
            notes.append(f"seeds: {len(seeds.rows)} rows from {len(seeds.files)} file(s), {len(q)} quarantined{first}, "
                         f"{seeds.duplicates} exact duplicates dropped")
            if not seeds.rows:
                problems.append(f"generate.seeds: no usable seed rows in {cfg.generate.seeds}{first}")
            if warning := teacher_warning(cfg.generate.teacher, [r["instruction"] for r in seeds.rows]):
                registry_warnings.append(warning)
    problems += endpoint_problems(cfg.generate)  # one call to /models: seconds, not minutes of retries
    for warning in [*offline_warnings(cfg.evaluate.tasks, cfg.evaluate.task_dir), *registry_warnings]:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    if problems:
        err.print(f"[red]{path}: {len(problems)} problem(s)[/red]", highlight=False)
        for p in problems:
            err.print(f"  {escape(p)}", highlight=False)
        raise typer.Exit(2)
    for note in notes:
        console.print(escape(note), highlight=False)
    console.print(f"[green]{path}: ok[/green] (pipeline '{escape(cfg.name)}', artifacts at "
                  f"{escape(ArtifactStore(cfg.artifact_root).uri())})", highlight=False)


@app.command()
def run(
    config: ConfigArg = None,
    overrides: Overrides = None,
    engine: Annotated[str, typer.Option(help="`prefect` (embedded unless PREFECT_API_URL is set) or `local`")] = "prefect",
    refresh: Annotated[list[str] | None, typer.Option(
        help="Rebuild this stage and everything after it even if finished (repeatable), e.g. --refresh evaluate")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show library warnings, progress bars and "
                                          "raw logs on the terminal (they always go to the run's log file).")] = False,
    allow_over_budget: OverBudget = False,
) -> None:
    """Run the whole loop; finished stages are skipped (Prefect: `Cached`)."""
    from synthtune import STAGES, progress
    from synthtune.runner import DAG
    from synthtune.terminal import RunView, TerminalWarnings, log_path, mute_console_handlers, print_summary, run_log

    cfg = over_budget(load(config, overrides), allow_over_budget)
    unknown = [r for r in refresh or [] if r not in STAGES]
    if unknown:
        raise fail(f"--refresh {unknown[0]}: not a stage (stages: {', '.join(STAGES)})")
    if engine not in ("prefect", "local"):
        raise fail(f"--engine must be prefect or local, not {engine}")
    from synthtune.cli.registry import same_name_warning

    if warning := same_name_warning(config, overrides, cfg):
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    log = log_path(cfg.artifact_root, cfg.name)
    os.environ["SYNTHTUNE_COMMAND"] = shlex.join(["synthtune", *sys.argv[1:]])  # for the model card
    start = time.perf_counter()
    failure: BaseException | None = None
    warnings_handler = TerminalWarnings(console)
    with run_log(log, verbose), RunView(console, [s.name for s in DAG], sys.stdout.isatty()) as view, \
            progress.listen(view), _interrupt_stops_children():
        logging.getLogger("synthtune").addHandler(warnings_handler)
        try:
            with _prefect_server(engine):
                if engine == "prefect":
                    from flows.pipeline import pipeline
                    from flows.tracking import drain

                    mute_console_handlers()
                    try:
                        refs = pipeline(cfg, refresh=list(refresh or []))
                    finally:
                        drain()  # its logs and events reach the server before the server stops
                else:
                    from synthtune.runner import run_all

                    refs = run_all(cfg, refresh=refresh or ())
        except BaseException as e:  # reported below, in one message, once the live view has stopped
            failure = e
            traceback.print_exc()  # the whole story goes to the log file
        finally:
            logging.getLogger("synthtune").removeHandler(warnings_handler)
    if isinstance(failure, KeyboardInterrupt):
        err.print(f"[red]interrupted[/red] during {view.current or 'startup'}: {_resume_hint(cfg, view.current)}; "
                  f"log: {log}", highlight=False)
        raise typer.Exit(130)
    if failure is not None:
        raise fail(f"{view.current or 'the run'} failed after {time.perf_counter() - start:.0f} s: "
                    f"{_one_message(failure)}\nfull log: {log}", 1)
    print_summary(console, cfg, refs, time.perf_counter() - start)
    console.print(f"log: {log}", highlight=False)


def _one_message(error: BaseException) -> str:
    """The real message of a failure: the error's own text, without the child's traceback."""
    text = str(error).split("--- in child process ---")[0].strip() or type(error).__name__
    lines = text.splitlines()
    return "\n".join(lines[:20]) + ("\n  ..." if len(lines) > 20 else "")


def _resume_hint(cfg, step: str | None) -> str:
    """Where an interrupted run can pick up from."""
    if step == "train":
        from synthtune.runner import plan
        from synthtune.stages.train import latest_valid_checkpoint, work_dir
        from synthtune.store import ArtifactStore

        with contextlib.suppress(Exception):
            folder = work_dir(ArtifactStore(cfg.artifact_root), plan(cfg)["train"]) / "checkpoints"
            ckpt = latest_valid_checkpoint(folder)
            if ckpt is not None:
                return f"training stopped; {ckpt.name} in {folder} is kept and the same command resumes from it"
            return f"training stopped before its first checkpoint (in {folder}); the same command starts it again"
    if step == "generate":
        return "finished answers are in the row cache; the same command asks only for the rest"
    return "finished stages are kept; the same command continues from there"


@contextlib.contextmanager
def _interrupt_stops_children():
    """Ctrl-C stops the training or distilabel child at once (it runs in a session of its own, so the
    terminal's SIGINT never reaches it), then interrupts the run (which releases the GPU slot)."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        from synthtune.child import stop_all

        stop_all(grace=5)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _prefect_server(engine: str):
    """The embedded server when the Prefect engine has no server to talk to (PREFECT_API_URL unset)."""
    if engine != "prefect" or os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    from synthtune.server import embedded_server

    return embedded_server()


@app.command()
def verify(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """Check every finished stage output of a config against its manifest, every byte (sha256). Exit 1 on any
    mismatch: a run would rebuild that stage rather than use it."""
    from concurrent.futures import ThreadPoolExecutor

    from synthtune.registry import RegistryError
    from synthtune.runner import DAG, plan
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    store = ArtifactStore(cfg.artifact_root)
    try:
        keys = plan(cfg)
    except RegistryError as e:
        raise fail(str(e)) from None
    steps = [s for s in DAG if s.name in keys]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL: outputs hashed in parallel
        found = {s.name: pool.submit(lambda s=s: None if store.manifest(s.stage.STAGE, keys[s.name]) is None else
                                     store.problems(s.stage.STAGE, keys[s.name], full=True)) for s in steps}
    table = Table(title=f"'{cfg.name}' outputs under {cfg.artifact_root} ({time.perf_counter() - start:.1f} s)")
    for col in ("step", "key", "status"):
        table.add_column(col, overflow="fold")
    bad = 0
    for s in steps:
        problems = found[s.name].result()
        bad += bool(problems)
        status = "not built" if problems is None else ("ok" if not problems else "MISMATCH: " + "; ".join(problems))
        table.add_row(s.name, keys[s.name], escape(status))
    console.print(table)
    if bad:
        raise fail(f"{bad} output(s) differ from their manifests: the next run rebuilds them", 1)


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Folder to create (must not exist or be empty).")]) -> None:
    """Write a starter pipeline folder (pipeline.yaml, a seed folder, an eval task) that validates and runs as
    is: the demo's settings, ready to be edited into your own. Its artifacts live inside the folder."""
    import shutil

    from synthtune.configs.pipeline import NAME

    src = project_root() / "configs"
    name = directory.resolve().name
    if not NAME.match(name):
        raise fail(f"init: '{name}' cannot name a pipeline (letters, digits, '.', '_' and '-'); choose another folder")
    if directory.exists() and any(directory.iterdir()):
        raise fail(f"init: {directory} exists and is not empty; choose a new folder")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "data", directory / "data")
    shutil.copytree(src / "eval_tasks", directory / "eval_tasks")
    lines = (src / "demo.yaml").read_text().splitlines()
    body = "\n".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):])
    body = body.replace("name: demo", f"name: {name}", 1)
    body = "\n".join("artifact_root: artifacts   # relative to this file: this project's own folder"
                     if line.startswith("artifact_root:") else line for line in body.splitlines())
    header = (f"# {name}: a synthtune pipeline, written by `synthtune init {directory}` from the demo's settings.\n"
              "# Make it yours: your seed prompts in data/seeds/ ({\"id\": ..., \"prompt\": ...} per line), your eval\n"
              "# task in eval_tasks/, your student and teacher below (tiny:teacher knows only the demo's 32 facts).\n"
              f"# Its artifacts (stage outputs, and registry/{name}/: its champion and history) are in artifacts/.\n"
              "#\n"
              f"# Run as: synthtune validate {directory}/pipeline.yaml && synthtune run {directory}/pipeline.yaml\n")
    (directory / "pipeline.yaml").write_text(header + body + "\n")
    console.print(f"wrote {directory}/pipeline.yaml, {directory}/data/seeds/, {directory}/eval_tasks/ (artifacts will "
                  f"go to {directory}/artifacts/)\n"
                  f"next: synthtune validate {directory}/pipeline.yaml && synthtune run {directory}/pipeline.yaml",
                  highlight=False)
