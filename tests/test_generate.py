"""generate: a real distilabel pipeline with a local transformers teacher."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from synthtune.artifacts import ArtifactStore
from synthtune.stages import generate
from synthtune.stages.generate import GenerationError, distilabel_guard, load_seeds
from synthtune.tiny import demo_facts


def test_bad_seed_rows_are_quarantined_with_file_and_line(demo_cfg, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": 1, "prompt": "ok"}\nnot json\n{"prompt": "no id"}\n{"id": 4, "prompt": 5}\n')
    good, bad = load_seeds(demo_cfg.generate.model_copy(update={"seeds": seeds}))
    assert good == [{"id": "1", "instruction": "ok"}]
    assert [(b["line"], b["reason"].split(":")[0]) for b in bad] == [
        (2, "not JSON"), (3, "missing field 'id'"), (4, "field 'prompt' missing or not text")]


def test_guard_restores_root_logging():
    root = logging.getLogger()
    before = list(root.handlers)
    with distilabel_guard():
        root.handlers[:] = [logging.NullHandler()]
    assert root.handlers == before


@pytest.mark.integration
def test_teacher_answers_through_distilabel(demo_run):
    cfg, refs = demo_run
    data = pd.read_parquet(f"{refs['generate'].uri}/data.parquet")
    answers = {f["id"]: f["answer"] for f in demo_facts()}
    assert len(data) == 35 and set(data["teacher"]) == {"tiny:teacher"}
    matched = [r.response == answers[r.id] for r in data.itertuples() if r.id in answers]
    assert sum(matched) == len(answers)  # the tiny teacher knows every fact, greedily
    manifest = json.loads(open(f"{refs['generate'].uri}/manifest.json").read())
    assert manifest["rows"]["seeds"] == 35 and "distilabel" in manifest["versions"]


@pytest.mark.integration
def test_seed_content_change_regenerates_never_stale(demo_run, tmp_path):
    cfg, refs = demo_run
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"id": "only", "prompt": demo_facts()[3]["question"]}) + "\n")
    changed = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"seeds": seeds})})
    ref = generate.run(changed, ArtifactStore(cfg.artifact_root))
    assert ref.key != refs["generate"].key
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    assert list(data["id"]) == ["only"] and data["response"][0] == demo_facts()[3]["answer"]


def test_no_usable_seed_fails_before_loading_the_teacher(demo_cfg, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "no id"}\n')
    cfg = demo_cfg.model_copy(update={"generate": demo_cfg.generate.model_copy(update={"seeds": seeds})})
    with pytest.raises(GenerationError, match="no usable seed rows"):
        generate.run(cfg, ArtifactStore(cfg.artifact_root))


@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_seeds_from_parquet_and_a_datasets_folder(demo_cfg, tmp_path, kind):
    rows = [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": None}]
    if kind == "parquet":
        path = tmp_path / "seeds.parquet"
        pd.DataFrame(rows).to_parquet(path)
    else:
        from datasets import Dataset

        path = tmp_path / "seeds_ds"
        Dataset.from_list(rows).save_to_disk(str(path))
    good, bad = load_seeds(demo_cfg.generate.model_copy(update={"seeds": path}))
    assert good == [{"id": "a", "instruction": "first"}]
    assert bad == [{"file": str(path), "line": 2, "id": "b", "reason": "field 'prompt' missing or not text"}]


@pytest.mark.integration
def test_preference_run_feeds_dpo(demo_run):
    """Teacher answers as `chosen`, the untrained student's as `rejected`: pairs that the filter keeps,
    the template stage tokenizes for DPO and the train stage's DPO mode trains on."""
    from synthtune.stages import filter, template, train

    cfg, _ = demo_run
    pref = cfg.model_copy(update={
        "generate": cfg.generate.model_copy(update={"mode": "preference", "rejected_model": "tiny:student"}),
        "train": cfg.train.model_copy(update={"mode": "dpo", "epochs": 6.0, "beta": 1.0, "learning_rate": 0.005,
                                              "logging_steps": 4})})
    store = ArtifactStore(cfg.artifact_root)
    gen = generate.run(pref, store)
    pairs = pd.read_parquet(f"{gen.uri}/data.parquet")
    answers = {f["id"]: f["answer"] for f in demo_facts()}
    assert {"chosen", "rejected", "rejected_model"} <= set(pairs.columns)
    known = pairs[pairs["id"].isin(list(answers))]
    assert (known["chosen"] == known["id"].map(answers)).all() and (known["chosen"] != known["rejected"]).all()
    kept = filter.run(pref, store, {"generate": gen})
    tokenized = template.run(pref, store, {"filter": kept})
    assert tokenized.summary["rows"]["output"] == kept.summary["rows"]["kept"] > 0
    ref = train.run(pref, store, {"template": tokenized})
    # trains on them (every-parameter-moves is test_train's DPO test; 24 steps here)
    assert ref.summary["mode"] == "dpo" and ref.summary["trainable_params_changed"] > 0
    assert ref.summary["last_loss"] < ref.summary["first_loss"]


def test_preference_mode_needs_a_rejected_model(demo_cfg):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="mode=preference needs rejected_model"):
        type(demo_cfg.generate).model_validate({**demo_cfg.generate.model_dump(), "mode": "preference"})
