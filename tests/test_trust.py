"""Artifacts are never silently wrong: an output changed, truncated or deleted after it was written is
rebuilt, never reused; `verify` names it; `--refresh` rebuilds a stage and what follows; `init`
writes a pipeline folder that runs as is."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from synthtune.registry import Registry
from synthtune.runner import run_all
from synthtune.store import ArtifactStore
from tests.support import DEMO

pytestmark = pytest.mark.integration


def _created(cfg, stage: str, key: str) -> str:
    """When an output was written: its manifest's time and its files' (a model card completed later
    by promote is documentation, not a rebuild)."""
    folder = Path(cfg.artifact_root) / stage / key
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest["created_at"] + str(sorted((folder / rel).stat().st_mtime_ns for rel in manifest["files"]
                                               if not rel.endswith("README.md")))


def _verify(cfg):
    return CliRunner().invoke(app, ["verify", str(DEMO), f"artifact_root={cfg.artifact_root}"])


def test_a_truncated_or_edited_output_is_rebuilt_and_never_used(copied, caplog):
    cfg, refs = copied
    before = {name: _created(cfg, ref.stage, ref.key) for name, ref in refs.items()}
    data = Path(cfg.artifact_root) / "filter" / refs["filter"].key / "data.parquet"
    original = data.read_bytes()
    data.write_bytes(original[: len(original) // 2])  # truncated
    result = _verify(cfg)
    assert result.exit_code == 1 and "data.parquet is" in result.output and "MISMATCH" in result.output

    with caplog.at_level(logging.WARNING, logger="synthtune.artifacts"):
        again = run_all(cfg)
    assert f"filter/{refs['filter'].key}: data.parquet is" in caplog.text and "rebuilding it" in caplog.text
    after = {name: _created(cfg, ref.stage, ref.key) for name, ref in again.items()}
    assert after["filter"] != before["filter"] and after["train"] == before["train"]  # only what was broken
    assert data.read_bytes() == original  # rebuilt to what it was

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF  # edited in place, same size
    data.write_bytes(bytes(flipped))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synthtune.artifacts"):
        run_all(cfg)
    assert "data.parquet was changed after it was written" in caplog.text and data.read_bytes() == original
    assert _verify(cfg).exit_code == 0


def test_a_deleted_adapter_is_trained_again_and_promote_never_points_at_nothing(copied):
    cfg, refs = copied
    adapter = Path(cfg.artifact_root) / "train" / refs["train"].key / "adapter"
    shutil.rmtree(adapter)
    again = run_all(cfg)
    assert (adapter / "adapter_model.safetensors").is_file() and again["train"].key == refs["train"].key
    registry = Registry(ArtifactStore(cfg.artifact_root), cfg.name)
    assert Path(registry.adapter_uri(registry.champion())).is_dir() and Path(registry.adapter_uri(registry.latest())).is_dir()


def test_refresh_rebuilds_a_stage_and_what_follows(copied):
    cfg, refs = copied
    before = {name: _created(cfg, ref.stage, ref.key) for name, ref in refs.items()}
    again = run_all(cfg, refresh=["evaluate"])
    after = {name: _created(cfg, ref.stage, ref.key) for name, ref in again.items()}
    assert {name for name in after if after[name] != before[name]} == {"evaluate[base]", "evaluate[tuned]", "promote"}
    assert again["evaluate[tuned]"].summary["scores"] == refs["evaluate[tuned]"].summary["scores"]  # same work, same numbers
    bad = CliRunner().invoke(app, ["run", str(DEMO), f"artifact_root={cfg.artifact_root}", "--refresh", "evaluation"])
    assert bad.exit_code == 2 and "--refresh evaluation: not a stage" in bad.output


def test_init_writes_a_pipeline_that_validates_and_runs(tmp_path):
    folder = tmp_path / "support-bot"
    result = CliRunner().invoke(app, ["init", str(folder)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in folder.iterdir()} == {"pipeline.yaml", "data", "eval_tasks"}
    pipeline = folder / "pipeline.yaml"
    assert "name: support-bot" in pipeline.read_text()
    checked = CliRunner().invoke(app, ["validate", str(pipeline)])
    assert checked.exit_code == 0, checked.output
    from synthtune.config import load_config

    cfg = load_config(pipeline, [f"artifact_root={tmp_path / 'artifacts'}", "train.epochs=2"])
    refs = run_all(cfg)
    assert refs["promote"].summary["reasons"] and refs["evaluate[tuned]"].summary["scores"]["demo_facts"]
    again = CliRunner().invoke(app, ["init", str(folder)])
    assert again.exit_code == 2 and "exists and is not empty" in again.output
