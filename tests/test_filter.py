"""filter: rows dropped for the stated reason, the funnel counts them."""

from __future__ import annotations

from synthtune.stages.filter import FilterConfig, apply_filters, normalize


def rows(*pairs):
    return [{"id": f"r{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(pairs)]


def test_exact_dedup_on_normalized_prompt_keeps_the_first():
    data = rows(("What is X?", "a b"), ("  what IS   x? ", "c d"), ("What is Y?", "e f"))
    kept, rejects, funnel = apply_filters(data, FilterConfig(), lambda t: len(t.split()))
    assert [r["id"] for r in kept] == ["r0", "r2"]
    assert rejects == [{**data[1], "filter": "exact_dedup", "reason": "same prompt as row r0"}]
    assert funnel[1] == {"filter": "exact_dedup", "rows_in": 3, "rows_out": 2, "dropped": 1}


def test_length_bounds_in_tokens_with_reasons():
    data = rows(("a", "one"), ("b", "one two three"), ("c", "1 2 3 4 5 6"))
    kept, rejects, funnel = apply_filters(data, FilterConfig(min_tokens=2, max_tokens=5), lambda t: len(t.split()))
    assert [r["id"] for r in kept] == ["r1"]
    assert {r["id"]: r["reason"] for r in rejects} == {
        "r0": "1 response tokens < min_tokens 2", "r2": "6 response tokens > max_tokens 5"}
    assert funnel[-1]["dropped"] == 2


def test_dedup_can_be_switched_off():
    data = rows(("same", "x y"), ("same", "x y"))
    kept, _, funnel = apply_filters(data, FilterConfig(dedup=False), lambda t: 2)
    assert len(kept) == 2 and [f["filter"] for f in funnel] == ["input", "token_length"]


def test_normalize():
    assert normalize("  A\tB \n c ") == "a b c"
