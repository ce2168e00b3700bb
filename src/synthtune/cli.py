"""The `synthtune` command: run the loop, validate a config, run one stage, build tiny models.

Run as: synthtune run                      (the demo: configs/demo.yaml on the embedded Prefect)
        synthtune run CONFIG a.b.c=value   (any pipeline, with overrides)
        synthtune validate CONFIG          (every field and referenced file, before any GPU time)
"""

from __future__ import annotations

import contextlib
import importlib.util
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


def _config_path(config: Path | None, overrides: list[str] | None) -> tuple[Path, list[str]]:
    """The config a command reads (the demo's when none is given: `synthtune run a.b=1`) and the overrides."""
    if config is not None and "=" in str(config) and not config.exists():
        config, overrides = None, [str(config), *(overrides or [])]
    return config or project_root() / "configs" / "demo.yaml", list(overrides or [])


def _load(config: Path | None, overrides: list[str] | None):
    from synthtune.config import ConfigError, load_config

    path, overrides = _config_path(config, overrides)
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        err.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def validate(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """Check every field, range and referenced file (seeds, task YAMLs and their data, the metric the
    gate compares) without loading a model. Exit 2 on error; warnings do not fail it."""
    from synthtune.artifacts import ArtifactStore
    from synthtune.eval_tasks import offline_warnings
    from synthtune.seeds import SeedError
    from synthtune.stages.generate import load_seeds
    from synthtune.stages.preflight import task_problems

    path = _config_path(config, overrides)[0]
    cfg = _load(config, overrides)
    problems, notes = task_problems(cfg), []
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
    for warning in offline_warnings(cfg.evaluate.tasks, cfg.evaluate.task_dir):
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
) -> None:
    """Run the whole loop; finished stages are skipped (Prefect: `Cached`)."""
    from synthtune import STAGES, progress
    from synthtune.runner import DAG
    from synthtune.terminal import RunView, TerminalWarnings, log_path, mute_console_handlers, run_log

    cfg = _load(config, overrides)
    unknown = [r for r in refresh or [] if r not in STAGES]
    if unknown:
        raise _fail(f"--refresh {unknown[0]}: not a stage (stages: {', '.join(STAGES)})")
    if engine not in ("prefect", "local"):
        raise _fail(f"--engine must be prefect or local, not {engine}")
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
                    flows = _load_flows()
                    mute_console_handlers()
                    try:
                        refs = flows.pipeline(cfg, refresh=list(refresh or []))
                    finally:
                        flows.drain()  # its logs and events reach the server before the server stops
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
        raise _fail(f"{view.current or 'the run'} failed after {time.perf_counter() - start:.0f} s: "
                    f"{_one_message(failure)}\nfull log: {log}", 1)
    print_summary(cfg, refs, time.perf_counter() - start)
    console.print(f"log: {log}", highlight=False)


def _one_message(error: BaseException) -> str:
    """The real message of a failure: the error's own text, without the child's traceback."""
    text = str(error).split("--- in child process ---")[0].strip() or type(error).__name__
    lines = text.splitlines()
    return "\n".join(lines[:20]) + ("\n  ..." if len(lines) > 20 else "")


def _resume_hint(cfg, step: str | None) -> str:
    """Where an interrupted run can pick up from."""
    if step == "train":
        from synthtune.artifacts import ArtifactStore
        from synthtune.runner import plan
        from synthtune.stages.train import latest_valid_checkpoint, work_dir

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


def _load_flows(name: str = "pipeline"):
    """flows/<name>.py from the checkout (the flows live beside the configs, not in the package)."""
    if f"flows.{name}" in sys.modules:
        return sys.modules[f"flows.{name}"]
    path = project_root() / "flows" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"flows.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"flows.{name}"] = module
    spec.loader.exec_module(module)
    return module


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
    console.print(f"artifacts: {root}  (the model in service: {root}/registry/champion.json, `synthtune show`)",
                  highlight=False)


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
) -> None:
    """Create or update the Prefect deployment(s) of a pipeline on the server at PREFECT_API_URL; the
    config becomes the deployment's parameters. Deploying again with the same arguments changes nothing."""
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail("PREFECT_API_URL is not set: deploy to a running server (prefect server start; "
                    "export PREFECT_API_URL=http://HOST:4200/api)")
    cfg = _load(config, overrides)
    module = _load_flows("deploy")
    try:
        plans = module.plan(cfg, name or cfg.name, cron, timezone, pool, split, cpu_pool, gpu_slot)
        ids = module.apply(plans)
    except module.DeployError as e:
        raise _fail(str(e)) from None
    for p, deployment_id in zip(plans, ids, strict=True):
        when = f"cron '{p.cron}' ({p.timezone})" if p.cron else "no schedule"
        console.print(f"{p.flow}/{p.name}: pool {p.pool}, {when}, id {deployment_id}", highlight=False)


@app.command()
def verify(config: ConfigArg = None, overrides: Overrides = None) -> None:
    """Check every finished stage output of a config against its manifest, every byte (sha256). Exit 1 on any
    mismatch: a run would rebuild that stage rather than use it."""
    from concurrent.futures import ThreadPoolExecutor

    from synthtune.artifacts import ArtifactStore
    from synthtune.registry import RegistryError
    from synthtune.runner import DAG, plan

    cfg = _load(config, overrides)
    store = ArtifactStore(cfg.artifact_root)
    try:
        keys = plan(cfg)
    except RegistryError as e:
        raise _fail(str(e)) from None
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
        raise _fail(f"{bad} output(s) differ from their manifests: the next run rebuilds them", 1)


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Folder to create (must not exist or be empty).")]) -> None:
    """Write a starter pipeline folder (pipeline.yaml, a seed folder, an eval task) that validates and runs as
    is: the demo, ready to be edited into your own."""
    import shutil

    src = project_root() / "configs"
    if directory.exists() and any(directory.iterdir()):
        raise _fail(f"init: {directory} exists and is not empty; choose a new folder")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "data", directory / "data")
    shutil.copytree(src / "eval_tasks", directory / "eval_tasks")
    text = (src / "demo.yaml").read_text().replace("name: demo", f"name: {directory.resolve().name}", 1)
    text = text.replace("synthtune run configs/demo.yaml", f"synthtune run {directory}/pipeline.yaml")
    (directory / "pipeline.yaml").write_text(text)
    console.print(f"wrote {directory}/pipeline.yaml, {directory}/data/seeds/, {directory}/eval_tasks/\n"
                  f"next: synthtune validate {directory}/pipeline.yaml && synthtune run {directory}/pipeline.yaml",
                  highlight=False)


# ---------------------------------------------------------------- the registry


def _registry(config: Path | None, overrides: list[str] | None):
    from synthtune.artifacts import ArtifactStore
    from synthtune.registry import Registry

    cfg = _load(config, overrides)
    return cfg, Registry(ArtifactStore(cfg.artifact_root))


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]{escape(message)}[/red]", highlight=False)
    return typer.Exit(code)


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
        raise _fail(str(e)) from None
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
        raise _fail(f"rollback: {e}") from None
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
        raise _fail(str(e)) from None
    if record is None:
        raise _fail(f"no champion yet in {registry.uri('champion.json')}: run the pipeline until one is promoted", 1)
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
    from synthtune.artifacts import ArtifactStore
    from synthtune.registry import RegistryError
    from synthtune.retention import apply_gc, plan_gc

    cfg = _load(config, overrides)
    store = ArtifactStore(cfg.artifact_root)
    try:
        plan = plan_gc(store, keep)
    except RegistryError as e:
        raise _fail(f"gc refuses to guess what is in use: {e}") from None
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
    cfg = _load(config, overrides)
    if not os.environ.get("PREFECT_API_URL"):
        raise _fail("seeds-arrived: PREFECT_API_URL is not set; it tells a running Prefect server, whose nightly "
                    "deployment reacts to it")
    _emit("synthtune.seeds.arrived", cfg.name, {"seeds": cfg.generate.seeds})
    console.print(f"emitted synthtune.seeds.arrived for pipeline '{cfg.name}'", highlight=False)


def _emit(event: str, pipeline: str, payload: dict) -> None:
    """A Prefect event, when a Prefect server is configured (tasks/events.py, from the checkout)."""
    if not os.environ.get("PREFECT_API_URL"):
        console.print(f"(no PREFECT_API_URL: {event} not emitted)", highlight=False)
        return
    sys.path.insert(0, str(project_root()))
    from tasks.events import emit, flush

    emit(event, pipeline, payload)
    flush()


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
    if _stage != "template":
        app.command(name=_stage)(_stage_command(_stage))


@app.command("template")
def template_command(
    config: ConfigArg = None, overrides: Overrides = None,
    show: Annotated[int, typer.Option(help="Print this many templated rows, trained tokens highlighted.", min=0)] = 0,
) -> None:
    """Run the template stage alone (upstream reused or run first); with --show N, print N templated rows with
    the trained tokens highlighted, the template's quirks and the length report, before any GPU time."""
    from synthtune.artifacts import ArtifactStore
    from synthtune.runner import run_all

    cfg = _load(config, overrides)
    refs = run_all(cfg, until="template",
                   on_step=lambda name, ref: console.print(f"[green]done[/green] {name} {ref.key} {ref.uri}"))
    ref = refs["template"]
    if not show:
        console.print(ref.summary)
        return
    from synthtune.stages.template import preview

    store = ArtifactStore(cfg.artifact_root)
    with store.local_copy(ref) as folder:
        rows = preview(cfg, folder, show)
    print_preview(rows, store.manifest("template", ref.key)["report"], sys.stdout.isatty())


def print_preview(rows, report: dict, tty: bool) -> None:
    """Templated rows with what is trained marked: green on a terminal, «between guillemets» otherwise."""
    from rich.text import Text

    for row_id, segments in rows:
        console.rule(f"row {row_id}", style="dim")
        text = Text()
        for part, trained in segments:
            if tty:
                text.append(part, style="bold green" if trained else "dim")
            else:
                text.append(f"«{part}»" if trained else part)
        console.print(text, highlight=False, soft_wrap=True)
    console.rule("report", style="dim")
    total = report["lengths"]["train"]["total"]
    console.print(f"rows in {report['rows_in']}, out {report['rows_out']}, quarantined {report['quarantined']}, "
                  f"dropped {report['dropped']}, truncated {report['truncated']}; trained-token share "
                  f"{report['trained_token_share']}; total tokens p50 {total.get('p50')}, p99 {total.get('p99')}, "
                  f"max {total.get('max')}", highlight=False)
    quirks = {k: report.get(k, 0) for k in ("system_merged", "system_folded", "double_bos_removed")}
    console.print("quirks: " + (", ".join(f"{k} {v}" for k, v in quirks.items() if v) or "none"), highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)


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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
