"""template: exact loss masks for five template families, quirks reported, lengths never cut silently."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from synthtune.chat import ChatEncoder, RowError, TemplateError, to_messages
from synthtune.stages import template
from synthtune.store import ArtifactStore, produce
from tests.support.chat_families import CHATML_MARKED, FAMILIES, LLAMA3_MARKED_EOT, Family, make_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Vardon?"},
    {"role": "assistant", "content": "The capital of Vardon is Quellis."},
    {"role": "user", "content": "And of Eskaria?"},
    {"role": "assistant", "content": "Eskaria's capital is Arvenport."},
]
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def trained_runs(tok, ids, mask) -> list[str]:
    """The decoded text of each run of trained tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_golden_template_family(family: Family):
    tok = make_tokenizer(family)
    enc = ChatEncoder(tok)
    ids, mask = enc.encode(CONVERSATION, "golden")
    expected_messages = CONVERSATION
    if not family.system_role:  # merged into the first user turn, and said so in the report
        expected_messages = [{"role": "user", "content": "Answer briefly.\n\nWhat is the capital of Vardon?"},
                             *CONVERSATION[2:]]
        assert enc.quirks.system_merged == 1 and "rejects a system role" in enc.quirks.notes[0]
    # the rendered text is exactly the tokenizer's own chat template output (one BOS)
    assert tok.decode(ids) == tok.apply_chat_template(expected_messages, tokenize=False)
    # trained: each reply and its end-of-turn token, nothing else
    assert [run.lstrip(" ") for run in trained_runs(tok, ids, mask)] == [r + family.eot for r in REPLIES]
    if family.tokenizer_adds_bos:
        assert enc.quirks.double_bos_removed == 1 and ids.count(tok.bos_token_id) == 1


def test_generation_markers_are_used_and_the_end_of_turn_still_trained():
    family = FAMILIES[0]
    tok = make_tokenizer(Family("marked", CHATML_MARKED, family.specials, family.eot, eos=family.eos))
    enc = ChatEncoder(tok)
    assert enc.has_generation_markers
    ids, mask = enc.encode(CONVERSATION, "marked")
    assert trained_runs(tok, ids, mask) == [r + "<|im_end|>" for r in REPLIES]


def test_markers_that_already_end_in_the_end_of_turn_are_not_widened():
    # Regression: the span ends in <|eot_id|>; widening it trained the next turn's <|start_header_id|>
    family = FAMILIES[1]
    assert LLAMA3_MARKED_EOT != family.template
    tok = make_tokenizer(Family("llama3-marked-eot", LLAMA3_MARKED_EOT, family.specials, family.eot, bos=family.bos,
                                eos=family.eos))
    enc = ChatEncoder(tok)
    assert enc.has_generation_markers
    ids, mask = enc.encode(CONVERSATION, "marked-eot")
    assert trained_runs(tok, ids, mask) == [r + "<|eot_id|>" for r in REPLIES]


def test_strict_alternation_error_names_the_row():
    tok = make_tokenizer(FAMILIES[2])  # mistral
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(TemplateError, match="row r17: the chat template refused this conversation: .*alternate"):
        ChatEncoder(tok).encode(bad, "r17")


def test_missing_chat_template_says_how_to_provide_one():
    tok = make_tokenizer(FAMILIES[0])
    tok.chat_template = None
    with pytest.raises(TemplateError, match="template.chat_template"):
        ChatEncoder(tok)


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "content is int"),
    ({"messages": [{"role": "user", "content": "q"}]}, "does not end with an assistant turn"),
    ({"text": "free text"}, "no `messages`"),
])
def test_malformed_rows_raise_row_errors(row, reason):
    with pytest.raises(RowError, match=reason):
        to_messages(row)


def test_preference_rows_split_where_dpo_expects(tiny_tokenizer):
    enc = ChatEncoder(tiny_tokenizer)
    prompt, chosen, rejected = enc.encode_preference(
        {"prompt": "What is the capital of Vardon?", "chosen": "The capital of Vardon is Quellis.",
         "rejected": "The capital of Vardon is Tarrow."}, "p1")
    full = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Vardon?"},
         {"role": "assistant", "content": "The capital of Vardon is Quellis."}], tokenize=False)
    assert tiny_tokenizer.decode(prompt + chosen) == full
    assert tiny_tokenizer.decode(rejected).startswith("The capital of Vardon is Tarrow.<|im_end|>")


# ---------------------------------------------------------------- the stage


def _filter_output(store, rows, key="f"):
    return produce(store, "filter", key, {}, {}, lambda st: pd.DataFrame(rows).to_parquet(st.path / "data.parquet"))


def _with_template(cfg, **update):
    return cfg.model_copy(update={"template": cfg.template.model_copy(update=update)})


ROWS = [
    {"id": "short", "prompt": "hi", "response": "hello"},
    {"id": "long_answer", "prompt": "hi", "response": " ".join(["The capital of Vardon is Quellis."] * 6)},
    {"id": "long_prompt", "prompt": " ".join(["What is the capital of Vardon?"] * 8), "response": "ok"},
]


@pytest.mark.parametrize("policy, kept, dropped, truncated, no_trained", [
    ("drop", ["short"], 2, 0, 0),
    # a cut reply keeps trained tokens; a prompt that fills max_length leaves none: dropped, never an empty target
    ("truncate", ["short", "long_answer"], 0, 1, 1),
])
def test_over_length_policy_is_counted(demo_cfg, policy, kept, dropped, truncated, no_trained):
    cfg = _with_template(demo_cfg, max_length=40, truncation=policy)
    store = ArtifactStore(cfg.artifact_root)
    ref = template.run(cfg, store, {"filter": _filter_output(store, ROWS)})
    out = pd.read_parquet(f"{ref.uri}/data.parquet")
    assert list(out["id"]) == kept
    assert all(len(ids) <= 40 and sum(m) > 0 for ids, m in zip(out["input_ids"], out["assistant_masks"], strict=True))
    report = json.loads(open(f"{ref.uri}/report.json").read())
    assert (report["dropped"], report["truncated"], report["dropped_no_trained_token"]) == (dropped, truncated, no_trained)
    assert report["over_limits"] == 2 and report["worst_rows"][0]["id"] in ("long_answer", "long_prompt")
    # 2 of 3 rows cut: the report says so loudly and suggests a length that covers p99
    need = int(report["lengths"]["train"]["total"]["p99"]) + 1
    assert any(f"template.max_length={need} covers p99" in w for w in report["warnings"])


def test_error_policy_names_the_row_and_commits_nothing(demo_cfg):
    cfg = _with_template(demo_cfg, max_length=40, truncation="error")
    store = ArtifactStore(cfg.artifact_root)
    with pytest.raises(TemplateError, match=r"row long_answer: \d+ tokens > template.max_length 40"):
        template.run(cfg, store, {"filter": _filter_output(store, ROWS)})
    assert store.ref("template", template.key(cfg, {"filter": "f"})) is None


def test_malformed_rows_are_quarantined_not_crashed_on(demo_cfg):
    rows = [{"id": "ok", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"id": "bad", "messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]
    store = ArtifactStore(demo_cfg.artifact_root)
    ref = template.run(demo_cfg, store, {"filter": _filter_output(store, rows)})
    quarantine = pd.read_parquet(f"{ref.uri}/quarantine.parquet")
    assert quarantine.to_dict("records") == [{"id": "bad", "reason": "turn 1: unknown role 'robot' (expected one of "
                                                                        "system, user, assistant)"}]
    assert ref.summary["rows"]["output"] == 1


def test_preference_prompt_budget_enforced_here(demo_cfg):
    rows = [{"id": "p", "prompt": " ".join(["What is the capital of Vardon?"] * 6), "chosen": "Quellis.",
             "rejected": "Tarrow."}]
    store = ArtifactStore(demo_cfg.artifact_root)
    cfg = _with_template(demo_cfg, max_length=64, max_prompt_length=20, truncation="truncate")
    ref = template.run(cfg, store, {"filter": _filter_output(store, rows)})
    out = pd.read_parquet(f"{ref.uri}/data.parquet").to_dict("records")[0]
    assert len(out["prompt_ids"]) == 20 and len(out["chosen_ids"]) > 0 and len(out["rejected_ids"]) > 0
    assert ref.summary["rows"]["truncated"] == 1


def test_length_report_png_and_percentiles(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    ref = template.run(demo_cfg, store, {"filter": _filter_output(store, ROWS)})
    png = open(f"{ref.uri}/lengths.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    stats = json.loads(open(f"{ref.uri}/manifest.json").read())["report"]["lengths"]["train"]
    assert set(stats) == {"prompt", "completion", "total"} and stats["total"]["n"] == 3


def test_a_template_that_rewrites_replies_is_refused_not_mismasked():
    family = FAMILIES[0]
    shouting = family.template.replace("message.content + '<|im_end|>'", "message.content | upper + '<|im_end|>'")
    tok = make_tokenizer(Family("shouting", shouting, family.specials, family.eot, eos=family.eos))
    with pytest.raises(TemplateError, match="row s1: the chat template rewrites assistant turn 2: its text is not in the "
                                            "rendering"):
        ChatEncoder(tok).encode(CONVERSATION, "s1")
