"""generate: a real distilabel pipeline with a local transformers teacher."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from synthtune.stages import generate
from synthtune.stages.generate import GenerationError, load_seeds
from synthtune.store import ArtifactStore
from synthtune.tiny import demo_facts


def test_bad_seed_rows_are_quarantined_with_file_and_line(demo_cfg, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": 1, "prompt": "ok"}\nnot json\n{"prompt": "no id"}\n{"id": 4, "prompt": 5}\n')
    got = load_seeds(demo_cfg.generate.model_copy(update={"seeds": str(seeds)}))
    assert got.rows == [{"id": "1", "instruction": "ok", "seed_file": "seeds.jsonl", "seed_line": 1}]
    assert [(b["line"], b["reason"].split(":")[0]) for b in got.quarantined] == [
        (2, "not JSON"), (3, "missing field 'id'"), (4, "field 'prompt' missing or not text")]


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
    changed = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"seeds": str(seeds)})})
    ref = generate.run(changed, ArtifactStore(cfg.artifact_root))
    assert ref.key != refs["generate"].key
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    assert list(data["id"]) == ["only"] and data["response"][0] == demo_facts()[3]["answer"]


def test_no_usable_seed_fails_before_loading_the_teacher(demo_cfg, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "no id"}\n')
    cfg = demo_cfg.model_copy(update={"generate": demo_cfg.generate.model_copy(update={"seeds": str(seeds)})})
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
    got = load_seeds(demo_cfg.generate.model_copy(update={"seeds": str(path)}))
    assert got.rows == [{"id": "a", "instruction": "first", "seed_file": path.name, "seed_line": 1}]
    assert got.quarantined == [{"file": path.name, "line": 2, "id": "b", "reason": "field 'prompt' missing or not text"}]


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


def test_each_mode_says_what_it_needs(demo_cfg):
    from pydantic import ValidationError

    gen = demo_cfg.generate.model_dump()
    cases = [({"mode": "preference"}, "mode=preference needs a judge, or a rejected_model"),
             ({"mode": "preference", "judge": "tiny:teacher"}, "needs two answers per prompt"),
             ({"mode": "sft", "seeds": None}, "mode=sft needs seeds"),
             ({"mode": "magpie", "teacher_kind": "openai"}, "mode=magpie needs teacher_kind=transformers")]
    for change, message in cases:
        with pytest.raises(ValidationError, match=message):
            type(demo_cfg.generate).model_validate({**gen, **change})
    type(demo_cfg.generate).model_validate({**gen, "mode": "magpie", "seeds": None})  # magpie needs no seeds


def _small(cfg, tmp_path, n: int = 6, **update):
    """`cfg` generating from the first `n` demo questions, with `update` applied to its generate section."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f["id"], "prompt": f["question"]}) + "\n" for f in demo_facts()[:n]))
    return cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"seeds": str(seeds), **update})})


@pytest.mark.integration
def test_judge_rates_with_ultrafeedback_and_picks_pairs_with_provenance(demo_cfg, tmp_path):
    """A real UltraFeedback pass (tiny:judge always rates the first answer shown 5 and the second 1):
    ratings and rationales land in the rows, the best rated is `chosen`, and the filter's judge
    threshold reads them."""
    from synthtune.stages import filter

    cfg = _small(demo_cfg, tmp_path, mode="preference", judge="tiny:judge", rejected_model="tiny:student")
    store = ArtifactStore(cfg.artifact_root)
    ref = generate.run(cfg, store)
    pairs = pd.read_parquet(f"{ref.uri}/data.parquet")
    answers = {f["id"]: f["answer"] for f in demo_facts()}
    assert len(pairs) == 6
    assert (pairs["judge"] == "tiny:judge").all() and (pairs["rating"] == 5).all() and (pairs["rejected_rating"] == 1).all()
    assert (pairs["rationale"] == "right").all() and (pairs["rejected_rationale"] == "wrong").all()
    assert (pairs["chosen_model"] == "tiny:teacher").all() and (pairs["rejected_model"] == "tiny:student").all()
    assert (pairs["chosen"] == pairs["id"].map(answers)).all()
    assert ref.summary["rows"]["ratings_generated"] == 6 and ref.summary["rows"]["ratings_reused"] == 0

    strict = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"min_judge_score": 5.5})})
    with pytest.raises(Exception, match="judge_score"):  # every pair rated 5 < 5.5: nothing left, funnel named
        filter.run(strict, store, {"generate": ref})

    # sft: each answer rated on its own, after the judge rated its calibration set (tolerated here: kappa >= -1)
    cal = _calibration(tmp_path / "labels.jsonl", [CALIBRATION[0], CALIBRATION[2], CALIBRATION[4], CALIBRATION[5]])
    sft = _small(demo_cfg, tmp_path, judge="tiny:judge", judge_calibration=cal, judge_min_kappa=-1.0)
    made = generate.run(sft, store)
    rows = pd.read_parquet(f"{made.uri}/data.parquet")
    assert (rows["rating"] == 5).all() and (rows["judge"] == "tiny:judge").all() and "response" in rows
    report = made.summary["judge_calibration"]  # in the manifest, for the funnel artifact
    assert (report["items"], report["kappa"], report["reject_recall"], report["position"]["pairs"]) == (4, 0.0, 0.0, 0)


def test_pair_picking_from_ratings():
    from synthtune.generation import pick_pair

    cands = [{"text": t} for t in "abc"]
    (best, r1, why1), (worst, r2, why2) = pick_pair(cands, [3, 5, 1], ["ok", "great", "bad"])
    assert (best["text"], r1, why1, worst["text"], r2, why2) == ("b", 5, "great", "c", 1, "bad")
    assert pick_pair(cands, [4, 4, 4], None) == "rated every answer 4"
    assert pick_pair(cands, [None, 5, None], []) == "rated fewer than two answers (unparsable output)"
    (best, *_), (worst, *_) = pick_pair(cands, [5, 5, 2], [])  # ties: the first shown wins
    assert best["text"] == "a" and worst["text"] == "c"


@pytest.mark.integration
def test_magpie_draws_instructions_and_answers_from_the_teacher_alone(demo_cfg, tmp_path):
    cfg = demo_cfg.model_copy(update={"generate": demo_cfg.generate.model_copy(update={
        "mode": "magpie", "seeds": None, "magpie_rows": 6, "temperature": 1.5, "max_new_tokens": 16, "batch_size": 3})})
    ref = generate.run(cfg, ArtifactStore(cfg.artifact_root))
    rows = pd.read_parquet(f"{ref.uri}/data.parquet")
    quarantined = pd.read_parquet(f"{ref.uri}/quarantine.parquet")
    assert len(rows) + len(quarantined) == 6 and len(rows) >= 2
    assert rows["prompt"].str.len().min() > 0 and rows["response"].str.len().min() > 0
    assert rows["prompt"].nunique() > 1 and (rows["teacher"] == "tiny:teacher").all()
    assert ref.summary["rows"]["seeds"] == 6


@pytest.mark.integration
@pytest.mark.parametrize("policy", ["quarantine", "truncate"])
def test_a_prompt_longer_than_the_teachers_context_is_never_sent_whole(demo_run, tmp_path, policy):
    """A 1 MB prompt used to keep generate busy for minutes; now it is quarantined (with its file, line
    and length) or cut to the teacher's limit, and counted either way."""
    cfg, _ = demo_run
    seeds = tmp_path / "seeds.jsonl"
    question = demo_facts()[0]["question"]
    seeds.write_text(json.dumps({"id": "ok", "prompt": question}) + "\n"
                     + json.dumps({"id": "huge", "prompt": "blah " * 200_000 + question}) + "\n")
    gen = cfg.generate.model_copy(update={"seeds": str(seeds), "long_prompts": policy})
    ref = generate.run(cfg.model_copy(update={"generate": gen}), ArtifactStore(str(tmp_path / "root")))
    rows = ref.summary["rows"]
    data = pd.read_parquet(f"{ref.uri}/data.parquet")
    limit = generate.teacher_context(gen) - gen.max_new_tokens
    if policy == "quarantine":
        assert (rows["too_long"], rows["truncated"], rows["output"]) == (1, 0, 1)
        [q] = pd.read_parquet(f"{ref.uri}/quarantine.parquet").to_dict("records")
        assert (q["id"], q["file"], q["line"]) == ("huge", "seeds.jsonl", "2")
        assert q["reason"].startswith("prompt is ") and f"over the teacher's limit of {limit}" in q["reason"]
    else:
        assert (rows["too_long"], rows["truncated"], rows["output"]) == (0, 1, 2)
        kept = data.set_index("id").loc["huge", "prompt"]
        assert kept.endswith(question) and len(kept) < 8 * limit  # the end, where the question is


def _calibration(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CALIBRATION = [  # two prompts labelled with a good and a bad answer each, plus two more answers alone
    {"prompt": "What is the capital of Vardon?", "response": "The capital of Vardon is Quellis.", "rating": 5},
    {"prompt": "What is the capital of Vardon?", "response": "Bananas are yellow.", "rating": 1},
    {"prompt": "What is the capital of Eskaria?", "response": "Purple.", "accept": False},
    {"prompt": "What is the capital of Eskaria?", "response": "Eskaria's capital is Arvenport.", "accept": True},
    {"prompt": "Who rules Tolvania?", "response": "I like trains.", "rating": 2},
    {"prompt": "Which river crosses Quellis?", "response": "The Amber river crosses Quellis.", "rating": 4},
]


def test_judge_agreement_and_position_consistency():
    import random

    from synthtune import judging

    rng = random.Random(7)
    human = [rng.random() < 0.5 for _ in range(400)]
    coin = judging.agreement(human, [rng.random() < 0.5 for _ in human])  # a judge that rates at random
    assert abs(coin["kappa"]) < 0.15 and coin["kappa"] < 0.4
    good = judging.agreement(human, [h if rng.random() < 0.95 else not h for h in human])
    assert good["kappa"] > 0.8 and good["reject_precision"] > 0.9 and good["reject_recall"] > 0.9
    assert judging.agreement([True, False], [None, False])["unrated"] == 1  # unrated: counted as disagreeing
    # the same pair in swapped order: a fair judge prefers the same answer, a first-position judge flips
    assert judging.consistency([[5, 1], [2, 4]], [[1, 5], [4, 2]])["share"] == 1.0
    assert judging.consistency([[5, 1], [5, 1]], [[5, 1], [5, 1]])["share"] == 0.0
    assert judging.consistency([[3, 3]], [[3, 3]])["share"] == 1.0 and judging.consistency([None], [[1, 2]])["share"] == 0


def test_calibration_file_errors_name_the_line(tmp_path):
    from synthtune import judging

    bad = _calibration(tmp_path / "cal.jsonl", [CALIBRATION[0], {"prompt": "p", "response": "r"}])
    with pytest.raises(judging.CalibrationError, match=r"cal.jsonl:2: needs a human 'rating'"):
        judging.load(bad, 4)
    same = _calibration(tmp_path / "same.jsonl", [CALIBRATION[0], CALIBRATION[3]])
    with pytest.raises(judging.CalibrationError, match="every answer is accepted"):
        judging.load(same, 4)
    labels = judging.load(_calibration(tmp_path / "ok.jsonl", CALIBRATION), 4)
    assert [lab.accept for lab in labels] == [True, False, False, True, False, True]
    assert [(a.line, b.line) for a, b in judging.pairs(labels)] == [(1, 2), (3, 4)]


@pytest.mark.integration
def test_an_uncalibrated_judge_stops_the_run_before_any_teacher_call(demo_cfg, tmp_path):
    """tiny:judge rates whatever it is shown first 5 and second 1: every labelled answer alone is
    accepted (kappa 0: no better than chance), and each pair's preference flips with the order
    (position consistency 0%). The run stops naming both figures; the teacher was never asked."""
    from synthtune import judging
    from synthtune.rowcache import RowCache
    from synthtune.stages.generate import cache_url

    cal = _calibration(tmp_path / "judge_labels.jsonl", CALIBRATION)
    cfg = _small(demo_cfg, tmp_path, judge="tiny:judge", judge_calibration=cal)
    store = ArtifactStore(cfg.artifact_root)
    with pytest.raises(judging.CalibrationError) as failed:
        generate.run(cfg, store)
    message = str(failed.value)
    assert "Cohen's kappa 0.000 < generate.judge_min_kappa 0.4" in message
    assert "position consistency 0% (0 of 2 pairs rated alike in swapped order)" in message
    assert "the teacher was not asked anything" in message
    assert RowCache(f"{cache_url(store)}/answers").lookup({"any"}) == {} and not list(
        (tmp_path / "artifacts" / "generate" / ".cache").glob("answers/**/*.parquet"))
    assert list((tmp_path / "artifacts" / "generate" / ".cache").glob("ratings/**/*"))  # the judge's were kept
