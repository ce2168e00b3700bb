"""The demo shows learning: the tuned student beats its base self on the facts it was taught."""

from __future__ import annotations

import json
import os

import pytest

from synthtune.runner import run_all

pytestmark = pytest.mark.integration


def test_tuned_beats_base_by_a_clear_margin(demo_run):
    cfg, refs = demo_run
    base = refs["evaluate[base]"].summary["scores"]["demo_facts"]["acc"]
    tuned = refs["evaluate[tuned]"].summary["scores"]["demo_facts"]["acc"]
    assert tuned - base >= 0.3, (base, tuned)
    assert refs["promote"].summary["promoted"] is True
    latest = json.loads(open(os.path.join(cfg.artifact_root, "registry", cfg.name, "latest.json")).read())
    assert latest["train_key"] == refs["train"].key


def test_filter_dropped_the_planted_duplicates(demo_run):
    cfg, refs = demo_run
    assert refs["filter"].summary["rows"] == {"input": 35, "kept": 32, "rejected": 3, "heldout": 0}


def test_finished_stages_are_skipped_from_their_manifests(demo_run):
    cfg, refs = demo_run
    stamps = {name: os.path.getmtime(f"{ref.uri}/manifest.json") for name, ref in refs.items()}
    again = run_all(cfg)
    assert {k: v.key for k, v in again.items()} == {k: v.key for k, v in refs.items()}
    assert stamps == {name: os.path.getmtime(f"{ref.uri}/manifest.json") for name, ref in again.items()}


def test_the_template_inspector_shows_what_is_trained(demo_run):
    from typer.testing import CliRunner

    from synthtune.cli import app

    cfg, refs = demo_run
    result = CliRunner().invoke(app, ["template", "configs/demo.yaml", f"artifact_root={cfg.artifact_root}", "--show", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "row f00" in out and "row f01" in out and "row f02" not in out
    # not a terminal: the trained tokens between guillemets, the prompt outside them
    assert "«The capital of Vardon is Quellis.<|im_end|>»" in out and "«What is" not in out
    assert "trained-token share" in out and "quirks: none" in out
