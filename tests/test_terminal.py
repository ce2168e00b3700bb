"""The run's terminal view: lines on a pipe, a live table with progress on a TTY."""

from __future__ import annotations

import io

from rich.console import Console

from synthtune.terminal import RunView


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=140, force_terminal=False), out


def test_a_pipe_gets_one_line_per_step_start_and_end():
    console, out = _console()
    with RunView(console, ["filter", "train", "evaluate[champion]"], tty=False) as view:
        view({"kind": "step_start", "step": "filter"})
        view({"kind": "step_end", "step": "filter", "state": "Completed",
              "summary": {"rows": {"kept": 32, "input": 35, "heldout": 0}}})
        view({"kind": "step_start", "step": "train"})
        view({"kind": "train", "step": 5, "total": 10, "loss": 1.23456789, "tokens_per_s": 100.0})  # no line
        view({"kind": "step_end", "step": "evaluate[champion]", "state": "Skipped",
              "summary": {"note": "no other champion to compare with"}})
    lines = [line.split() for line in out.getvalue().splitlines()]
    assert [line[:2] for line in lines] == [["filter", "running"], ["filter", "Completed"], ["train", "running"],
                                            ["evaluate[champion]", "Skipped"]]
    assert "kept 32 of 35" in out.getvalue() and "no other champion" in out.getvalue()


def test_a_tty_shows_a_progress_bar_with_step_loss_and_throughput():
    console, out = _console()
    view = RunView(console, ["train", "evaluate[base]"], tty=True)
    view({"kind": "step_start", "step": "train"})
    view({"kind": "train", "step": 196, "total": 240, "loss": 1.0719881057739258, "tokens_per_s": 14453.0})
    console.print(view.render())
    text = out.getvalue()
    assert "Running" in text and "step 196/240  loss 1.0720  14453.0 tok/s" in text and "pending" in text
    view({"kind": "step_end", "step": "train", "state": "Completed", "summary": {}})
    view({"kind": "step_start", "step": "evaluate[base]"})
    view({"kind": "evaluate", "done": 64, "total": 128})
    console.print(view.render())
    assert "requests 64/128" in out.getvalue()
