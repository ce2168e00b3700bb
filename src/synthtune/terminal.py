"""What `synthtune run` shows on the terminal, and where everything else goes.

The terminal gets what a person wants: which stage is running, how far along it is, and the result.
On a TTY that is a live view, one line per stage (state, elapsed, rows, result) with a progress bar
for training (step/total, loss, tokens/s) and for evaluation (requests scored); elsewhere, one
concise line per stage start and end. synthtune's own warnings are shown; errors are never hidden
(the one real message ends the output).

Everything else (library warnings, progress bars, raw trainer logs, Prefect's engine logs, the
children's output) goes to a per-run log file under the artifact root (and to the Prefect run logs,
as before); `-v` shows it on the terminal too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

QUIET_ENV = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def log_path(artifact_root: str, name: str) -> Path:
    """The run's log file: under a local artifact root, else in the local cache."""
    from synthtune.digests import cache_root
    from synthtune.store import ArtifactStore

    store = ArtifactStore(artifact_root)
    folder = Path(store.root) / "logs" if store.local else cache_root() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{os.getpid()}.log"


@contextlib.contextmanager
def run_log(path: Path, verbose: bool) -> Iterator[Any]:
    """Send this process's stderr (and its children's output) to `path`; with `verbose`, to the
    terminal as well. Yields a stream on the terminal's stderr, for messages meant for a person."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    env_before = {k: os.environ.get(k) for k in [*QUIET_ENV, "SYNTHTUNE_LOG_FILE"]}
    os.environ["SYNTHTUNE_LOG_FILE"] = str(path)
    if not verbose:
        os.environ.update(QUIET_ENV)
    pump = None
    if verbose:  # tee: a pipe read by a thread that writes to both
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)

        def tee() -> None:
            while chunk := os.read(read_end, 65536):
                os.write(log_fd, chunk)
                os.write(saved, chunk)

        pump = threading.Thread(target=tee, daemon=True)
        pump.start()
    else:
        os.dup2(log_fd, 2)
    terminal_err = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield terminal_err
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        if pump is not None:
            pump.join(timeout=2)
        os.close(saved)
        os.close(log_fd)
        terminal_err.close()
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def redirect_stream_handlers(old, new) -> None:
    """Every logging StreamHandler writing to `old` (on any logger) writes to `new` from here on,
    including a handler that prints through a rich console (Prefect's)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(new)
            if hasattr(handler, "console"):
                handler.console.file = new


def mute_console_handlers() -> None:
    """Prefect's console handlers write its engine logs to the terminal; from here on they write to the
    log file (stderr), and only our view writes to stdout."""
    redirect_stream_handlers(sys.stdout, sys.stderr)


def scores_line(scores: dict) -> str:
    """`task metric value, ...; ...`: stderrs left out, and the forgetting task by its loss alone (its
    perplexities are astronomically large on a small model and say nothing more)."""
    def metrics(task: str, ms: dict) -> dict:
        return {"loss": ms["loss"]} if task == "forgetting" and "loss" in ms else {
            m: v for m, v in ms.items() if not m.endswith("stderr")}

    return "; ".join(f"{t} " + ", ".join(f"{m} {_fmt(v)}" for m, v in metrics(t, ms).items()) for t, ms in scores.items())


def describe(step: str, summary: dict, cached: bool = False) -> str:
    """One line of what a finished step produced (a cached step: what it reused, not what it once made)."""
    if "note" in summary:
        return summary["note"]
    rows = summary.get("rows", {})
    if step == "generate" and cached:
        return f"rows {rows.get('output')} reused from an earlier run; nothing asked of the teacher"
    if step == "generate":
        return (f"rows {rows.get('output')} (new {rows.get('new')}); answers {rows.get('reused')} reused, "
                f"{rows.get('generated')} generated; quarantined {rows.get('quarantined')}")
    if step == "filter":
        return f"kept {rows.get('kept')} of {rows.get('input')}, held out {rows.get('heldout')}"
    if step == "template":
        return (f"rows {rows.get('output')}, dropped {rows.get('dropped')}, truncated {rows.get('truncated')}; "
                f"p99 {summary.get('p99_tokens')} tokens")
    if step == "train":
        loss = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (summary.get("first_loss"), summary.get("last_loss"))]
        return (f"loss {loss[0]} -> {loss[1]} in {summary.get('steps')} steps, {summary.get('tokens_per_s')} tok/s"
                + _start(summary))
    if step.startswith("evaluate"):
        return scores_line(summary.get("scores", {}))
    if step == "promote":
        if "outcome" in summary:
            return summary["outcome"]
        return ("PROMOTED" if summary.get("promoted") else "not promoted") + (
            f": {summary['reasons'][-2] if len(summary.get('reasons', [])) > 1 else ''}" if summary.get("reasons") else "")
    return ""


@dataclass
class StepView:
    state: str = "pending"
    started: float | None = None
    ended: float | None = None
    detail: str = ""
    progress: dict = field(default_factory=dict)

    def elapsed(self) -> str:
        if self.started is None:
            return ""
        return f"{(self.ended or time.monotonic()) - self.started:5.1f} s"


class RunView:
    """Listens to synthtune.progress events and shows them: a live view on a TTY, lines elsewhere."""

    def __init__(self, console, steps: list[str], tty: bool):
        self.console, self.tty = console, tty
        self.steps = {s: StepView() for s in steps}
        self.current: str | None = None
        self.live = None
        self.lock = threading.Lock()

    def __enter__(self):
        if self.tty:
            from rich.live import Live

            self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        with self.lock:
            kind = event["kind"]
            if kind == "step_start":
                view = self.steps.setdefault(event["step"], StepView())
                view.state, view.started, view.progress = "Running", time.monotonic(), {}
                self.current = event["step"]
                if not self.tty:
                    self.console.print(escape(f"{event['step']:<18} running"), highlight=False)
            elif kind == "step_end":
                view = self.steps.setdefault(event["step"], StepView())
                view.state, view.ended = event["state"], time.monotonic()
                view.detail = describe(event["step"], event.get("summary") or {}, event["state"] == "Cached") \
                    if event["state"] != "Failed" else ""
                if not self.tty:
                    self.console.print(escape(f"{event['step']:<18} {view.state:<9} {view.elapsed()}  {view.detail}"),
                                       highlight=False)
            elif kind == "flow_run":  # against a Prefect server: where to watch this run
                self.console.print(escape(f"flow run {event['name']}: {event['url']}"), highlight=False)
            elif kind in ("train", "evaluate", "generate") and self.current in self.steps:
                self.steps[self.current].progress = event
            if self.live is not None:
                self.live.update(self.render())

    def render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        colours = {"Completed": "green", "Cached": "cyan", "Failed": "red", "Running": "yellow", "pending": "dim",
                   "Skipped": "dim"}
        table = Table(box=None, show_header=True, header_style="bold")
        for col in ("step", "state", "elapsed", "", "result"):
            table.add_column(col)
        for name, view in self.steps.items():
            bar, detail = "", view.detail
            p = view.progress
            if view.state == "Running" and p.get("total"):
                done = p.get("step", p.get("done", 0)) or 0
                bar = ProgressBar(total=p["total"], completed=done, width=24)
                if p["kind"] == "train":
                    loss = p.get("loss")
                    detail = (f"step {done}/{p['total']}  loss {f'{loss:.4f}' if isinstance(loss, float) else '-'}"
                              f"  {p.get('tokens_per_s') or '-'} tok/s")
                elif p["kind"] == "generate":
                    detail = (f"{p.get('what')}: {done}/{p['total']} rows  {p.get('rows_per_s')} rows/s  "
                              f"{p.get('in_flight')} in flight  {p.get('retries')} retries")
                else:
                    detail = f"requests {done}/{p['total']}"
            table.add_row(escape(name), f"[{colours.get(view.state, 'white')}]{view.state}[/]", view.elapsed(), bar,
                          escape(detail))
        return table


class TerminalWarnings(logging.Handler):
    """synthtune's own warnings and errors, one line each on the terminal (they also go to the log)."""

    def __init__(self, console):
        super().__init__(level=logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.print(f"[yellow]warning:[/yellow] {escape(record.getMessage())}", highlight=False)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_summary(console, cfg, refs: dict, seconds: float) -> None:
    """Rows per stage, train loss, base vs tuned scores, where the artifacts are."""
    from rich.table import Table

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
            result = ("cached: nothing asked of the teacher this run" if ref.reused else
                      f"answers: {r.get('reused')} reused, {r.get('generated')} generated")
        elif name == "train":
            result = (("cached: " if ref.reused else "") + f"loss {_fmt(s.get('first_loss'))} -> "
                      f"{_fmt(s.get('last_loss'))} in {s.get('steps')} steps (quantization {s.get('quantization')}, "
                      f"{s.get('tokens_per_s')} tok/s)" + _start(s))
        elif name.startswith("evaluate"):
            result = scores_line(s.get("scores", {}))
        elif name == "promote":
            verdict = s.get("outcome") or ("PROMOTED" if s.get("promoted") else "NOT promoted")
            result = f"{verdict}: " + "; ".join(s.get("reasons", []))
        elif name == "template":
            result = f"trained-token share {s.get('trained_token_share')}, p99 {s.get('p99_tokens')} tokens"
        table.add_row(escape(name), ref.key, rows, escape(result))
    console.print(table)
    if "promote" in refs:  # a whole night: what it cost (synthtune.ledger)
        from synthtune.ledger import night, summary_line

        console.print(escape(summary_line(night(cfg, refs))), highlight=False)
    root = refs["promote"].uri.rsplit("/promote/", 1)[0] if "promote" in refs else cfg.artifact_root
    console.print(f"artifacts: {root}  (the model in service: {root}/registry/{cfg.name}/champion.json, "
                  f"`synthtune show`)", highlight=False)


def print_preview(console, rows, report: dict, tty: bool) -> None:
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


def _start(summary: dict) -> str:
    """Where a night's training started, when it is not a plain night from base (train.init)."""
    start = summary.get("note") or summary.get("start")
    return f"; {start}" if start and start != "from base" else ""
