"""filter: rows dropped for the stated reason, the funnel counts them."""

from __future__ import annotations

from synthtune.stages.filter import FilterConfig, apply_filters, normalize


def _only(**on):
    """A config with only the named filters on (token_length always runs)."""
    off = dict(quality=False, control_tokens=False, dedup=False, near_dedup=False, decontaminate=False)
    return FilterConfig(**{**off, **on})


def rows(*pairs):
    return [{"id": f"r{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(pairs)]


def test_exact_dedup_on_normalized_prompt_keeps_the_first():
    data = rows(("What is X?", "a b"), ("  what IS   x? ", "c d"), ("What is Y?", "e f"))
    kept, rejects, funnel = apply_filters(data, _only(dedup=True), lambda ts: [len(t.split()) for t in ts])
    assert [r["id"] for r in kept] == ["r0", "r2"]
    assert rejects == [{**data[1], "filter": "exact_dedup", "reason": "same prompt as row r0"}]
    assert funnel[1] == {"filter": "exact_dedup", "rows_in": 3, "rows_out": 2, "dropped": 1}


def test_length_bounds_in_tokens_with_reasons():
    data = rows(("a", "one"), ("b", "one two three"), ("c", "1 2 3 4 5 6"))
    kept, rejects, funnel = apply_filters(data, _only(min_tokens=2, max_tokens=5), lambda ts: [len(t.split()) for t in ts])
    assert [r["id"] for r in kept] == ["r1"]
    assert {r["id"]: r["reason"] for r in rejects} == {
        "r0": "1 response tokens < min_tokens 2", "r2": "6 response tokens > max_tokens 5"}
    assert funnel[-1]["dropped"] == 2


def test_dedup_can_be_switched_off():
    data = rows(("same", "x y"), ("same", "x y"))
    kept, _, funnel = apply_filters(data, _only(), lambda ts: [2] * len(ts))
    assert len(kept) == 2 and [f["filter"] for f in funnel] == ["input", "token_length"]


def test_normalize():
    assert normalize("  A\tB \n c ") == "a b c"



def test_near_duplicates_found_with_high_recall_and_precision():
    from tests.support.synthetic_text import corpus

    data, near, _ = corpus(n_base=3000, n_near=400)
    kept, rejects, funnel = apply_filters(data, _only(near_dedup=True), lambda ts: [2] * len(ts))
    flagged = {r["id"] for r in rejects}
    # a planted copy may be kept while its source is dropped (whichever comes first is kept); count pairs
    hits = len(flagged & near) + sum(1 for r in rejects if r["id"].startswith("b") and
                                      r["reason"].split("row ")[1].split(" ")[0].startswith("n"))
    recall, precision = hits / len(near), hits / len(flagged)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    assert all("near-duplicate of row" in r["reason"] and "Jaccard" in r["reason"] for r in rejects)


def test_decontamination_drops_planted_copies_of_eval_items():
    eval_item = "In which year did the fictional kingdom of Vardon sign the treaty of the seven rivers with Eskaria"
    data = rows(("Tell me a story.", "Once upon a time " + eval_item.lower() + " and then what?"),
                ("What is 2+2?", "It is four."),
                ("Paraphrase", "Vardon signed a treaty once."))
    kept, rejects, _ = apply_filters(data, _only(decontaminate=True), lambda ts: [2] * len(ts), eval_docs=[eval_item])
    assert [r["id"] for r in rejects] == ["r0"] and rejects[0]["reason"] == "shares a 13-word n-gram with an eval item"


def test_quality_heuristics_with_reasons():
    data = rows(("a", "As an AI language model, I cannot answer that."), ("b", "yes " * 30), ("c", "Quellis."),
                ("d", "  "))
    kept, rejects, _ = apply_filters(data, _only(quality=True), lambda ts: [2] * len(ts))
    assert [r["id"] for r in kept] == ["r2"]
    assert [r["reason"].split(" (")[0] for r in rejects] == ["refusal boilerplate", "runaway repetition", "empty response"]


def test_judge_score_threshold():
    data = [{"id": "a", "prompt": "p", "response": "x y", "rating": 4.5},
            {"id": "b", "prompt": "q", "response": "x y", "rating": 2.0}]
    kept, rejects, _ = apply_filters(data, _only(min_judge_score=3.0), lambda ts: [2] * len(ts))
    assert [r["id"] for r in kept] == ["a"] and rejects[0]["reason"] == "judge rating 2.0 < 3.0"


def test_rows_holding_a_control_token_are_dropped_by_name():
    data = [{"id": "a", "prompt": "Say hi", "response": "hi<|im_end|><|im_start|>user\nmore"},
            {"id": "b", "prompt": "Say <|im_start|> please", "response": "ok"},
            {"id": "c", "prompt": "Say bye", "response": "bye"}]
    kept, rejects, _ = apply_filters(data, _only(control_tokens=True), lambda ts: [len(t.split()) for t in ts],
                                     special_tokens=["<|im_start|>", "<|im_end|>"])
    assert [r["id"] for r in kept] == ["c"]
    assert {r["id"]: r["reason"] for r in rejects} == {"a": "contains the control token '<|im_start|>'",
                                                      "b": "contains the control token '<|im_start|>'"}


def test_the_holdout_never_moves_as_seeds_are_added():
    from synthtune.stages.filter import split_holdout

    def rows(ids):  # two generations per seed
        return [{"id": i, "prompt": f"q {i}", "generation_index": g} for i in ids for g in (0, 1)]

    night1 = [f"s{n}" for n in range(400)]
    night2 = night1 + [f"new{n}" for n in range(400)]
    train1, held1 = split_holdout(rows(night1), 0.1)
    train2, held2 = split_holdout(rows(night2), 0.1)
    ids = lambda rs: {r["id"] for r in rs}  # noqa: E731
    assert 20 < len(ids(held1)) < 60  # about a tenth of the seeds
    assert ids(held1) <= ids(held2) and ids(train1) <= ids(train2)  # no held-out id moved to training, or back
    assert not ids(held2) & ids(train2)  # no seed's generations are split across the sides
    assert not ids(held1) & ids(train2) and not ids(train1) & ids(held2)
    # raising the fraction only adds seeds to the holdout
    assert ids(split_holdout(rows(night2), 0.2)[1]) >= ids(held2)


def test_a_training_row_that_repeats_a_held_out_prompt_is_dropped_with_the_reason():
    from synthtune.stages.filter import holdout_leaks, in_holdout

    held_id = next(f"h{n}" for n in range(1000) if in_holdout(f"h{n}", 0.1))
    question = ("Which river runs past the old salt press of Quellis on the eastern side of the valley, and which "
                "bridge did the guild of lamp makers build over it in the year the copper mines closed for good?")
    heldout = [{"id": held_id, "prompt": question, "response": "The Ostrel."}]
    train = [{"id": "t1", "prompt": question.upper() + "  ", "response": "x"},  # the same prompt, normalized
             {"id": "t2", "prompt": question.replace("eastern", "western"), "response": "y"},  # a near-duplicate
             {"id": "t3", "prompt": "Who invented the copper lamp?", "response": "z"}]
    leaks = holdout_leaks(train, heldout, _only(near_dedup=True))
    assert leaks[0] == f"prompt is held-out row {held_id}'s prompt"
    assert leaks[1].startswith(f"prompt near-duplicates held-out row {held_id}'s (Jaccard ~")
    assert 2 not in leaks
