"""Early cutoff: a stage's key covers its upstream outputs' content digests, not their keys. An upstream
stage that reruns and writes byte-identical output leaves everything after it reused; fields that
change no output are in no key; the merged export is added to a finished adapter without retraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from synthtune.runner import plan, run_all
from synthtune.stages import train
from synthtune.store import ArtifactStore

pytestmark = pytest.mark.integration


def _manifest(cfg, ref) -> dict:
    return json.loads((Path(cfg.artifact_root) / ref.stage / ref.key / "manifest.json").read_text())


def test_editing_the_eval_data_reruns_filter_but_not_training(copied, tmp_path):
    cfg, refs = copied
    tasks = tmp_path / "eval_tasks"
    shutil.copytree(cfg.evaluate.task_dir, tasks)
    moved = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"task_dir": tasks})})
    assert plan(moved) == plan(cfg)  # the same contents elsewhere: the same keys
    with open(tasks / "demo_facts.jsonl", "a") as f:  # a new eval item, which no training row contains
        f.write(json.dumps({"id": "q-new", "question": "What colour is the sky of Orvane?", "label": 0,
                            "answer": "The sky of Orvane is green.", "choices": ["green", "blue", "red", "grey"]}) + "\n")
    again = run_all(moved)
    assert not again["filter"].reused and again["filter"].key != refs["filter"].key  # decontamination rechecked
    assert again["filter"].digest == refs["filter"].digest  # ... and wrote the same rows
    assert {name for name, ref in again.items() if ref.reused} == {"generate", "template", "train"}
    assert again["train"].key == refs["train"].key and _manifest(cfg, again["train"]) == _manifest(cfg, refs["train"])
    assert not again["evaluate[tuned]"].reused  # the eval set changed: scored again


def test_fields_that_change_no_output_are_in_no_key(demo_cfg):
    base = plan(demo_cfg)
    for section, field, value in (("generate", "batch_size", 99), ("generate", "concurrency", 8),
                                  ("generate", "replicas", 2), ("generate", "max_requests_per_s", 5.0),
                                  ("train", "merge", True), ("train", "save_steps", 7), ("train", "logging_steps", 1)):
        part = getattr(demo_cfg, section).model_copy(update={field: value})
        assert plan(demo_cfg.model_copy(update={section: part})) == base, f"{section}.{field} moved a key"


def test_turning_merge_on_adds_the_export_to_the_adapter_without_retraining(copied):
    cfg, refs = copied
    store = ArtifactStore(cfg.artifact_root)
    before = _manifest(cfg, refs["train"])
    merged_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"merge": True})})
    assert plan(merged_cfg) == plan(cfg)
    ref = train.run(merged_cfg, store, {"template": refs["template"]})
    after = _manifest(cfg, ref)
    assert ref.key == refs["train"].key and ref.digest == refs["train"].digest  # the same adapter: nothing retrained
    assert after["created_at"] == before["created_at"] and after["files"]["adapter/adapter_model.safetensors"] == \
        before["files"]["adapter/adapter_model.safetensors"]
    assert {f for f in after["files"] if f.startswith("merged/")} >= {"merged/model.safetensors", "merged/config.json"}
    assert after["summary"]["serving"]["merge_parity"]["identical"] == 8
    assert store.problems("train", ref.key) == []  # the output stays intact by its manifest
    again = run_all(merged_cfg)  # the next night: everything reused, the export is there already
    assert {name for name, r in again.items() if not r.reused} == set()
