"""Golden tests over real chat templates (tests/templates/, sources in its README): every template,
single- and multi-turn, with and without a system prompt, with a tokenizer that adds BOS and one that
does not. A case passes when the rendering is apply_chat_template's, the trained tokens are exactly
each reply plus its one end-of-turn token, and there is no double BOS anywhere at the start."""

from __future__ import annotations

import functools

import pytest

from synthtune.chat import ChatEncoder
from tests.support.template_corpus import CASES, REPLIES, SPECS, SYSTEM, Spec, make_tokenizer

GOLDEN = [(spec, case, system, adds_bos) for spec in SPECS for case in CASES for system in (False, True)
          for adds_bos in ((False, True) if spec.bos else (False,))]


@functools.cache
def tokenizer(spec: Spec, adds_bos: bool):
    return make_tokenizer(spec, adds_bos)


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


def leading_bos(tok, ids) -> int:
    """How many BOS tokens open the sequence, whitespace between them ignored."""
    n = 0
    for i in ids:
        if i == tok.bos_token_id:
            n += 1
        elif tok.decode([i]).strip():
            break
    return n


def test_the_corpus_covers_what_people_use():
    assert len(SPECS) >= 15 and len({s.file for s in SPECS}) == len(SPECS)
    names = " ".join(s.name for s in SPECS)
    for family in ("llama3.jinja", "llama3_1", "llama3_2", "llama3_training", "qwen2_5", "qwen3", "mistral-7b-instruct-v0.1",
                   "mistral-nemo", "mistral-small-3.1", "gemma", "gemma3", "phi3", "phi3_5", "phi-4", "granite", "zephyr",
                   "deepseek-r1", "cohere", "smollm2", "olmo-2"):
        assert family.removesuffix(".jinja") in names, family
    assert sum(s.name.startswith("community-") for s in SPECS) >= 3  # {% %} tags on separate lines


@pytest.mark.parametrize("spec, case, system, adds_bos", GOLDEN, ids=lambda v: v.name if isinstance(v, Spec) else str(v))
def test_real_template(spec: Spec, case: str, system: bool, adds_bos: bool):
    tok = tokenizer(spec, adds_bos)
    enc = ChatEncoder(tok)
    messages = [*([{"role": "system", "content": SYSTEM}] if system else []), *CASES[case]]
    prepared, rendering = enc.prepare(messages, "golden")
    assert rendering == tok.apply_chat_template(prepared, tokenize=False)  # exactly the model's own template
    if system:  # kept: natively, or merged/folded into the first user turn where the template loses it
        assert SYSTEM in rendering
    ids, mask = enc.encode(messages, "golden")
    replies = REPLIES[: len(CASES[case]) // 2]
    assert [run.strip() for run in trained_runs(tok, ids, mask)] == [r + spec.eot for r in replies]
    assert leading_bos(tok, ids) <= 1  # no double BOS, whatever whitespace the template writes before it


# ---------------------------------------------------------------- the four failure classes, one regression each


def _spec(name: str) -> Spec:
    return next(s for s in SPECS if s.name == name)


def test_markers_that_include_the_end_of_turn_train_nothing_after_it():
    """Llama 3 with {% generation %} around content + <|eot_id|> (and Gemma's around content +
    <end_of_turn>\\n): nothing after the end-of-turn is trained, not the next header, not the newline."""
    for name, after in (("trl-llama3_training", "<|start_header_id|>"), ("trl-gemma_training", "\n")):
        spec = _spec(name)
        tok = tokenizer(spec, False)
        ids, mask = ChatEncoder(tok).encode(CASES["multi"], "m")
        runs = trained_runs(tok, ids, mask)
        assert [r.strip() for r in runs] == [r + spec.eot for r in REPLIES] and not any(r.endswith(after) for r in runs)


def test_bos_after_leading_whitespace_is_one_bos():
    """The community Mistral template renders '\\n<s>[INST] ...' and the tokenizer adds BOS too:
    '<s> \\n <s>' would train with two BOS; one is kept, at the start, and the quirk is reported."""
    spec = _spec("community-mistral-instruct")
    tok = tokenizer(spec, True)
    enc = ChatEncoder(tok)
    assert enc.render(CASES["single"]).startswith("\n<s>")
    ids, _ = enc.encode(CASES["single"], "b")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert enc.quirks.double_bos_removed == 1 and "whitespace, then BOS" in enc.quirks.notes[0]


def test_whitespace_between_jinja_tags_is_located_not_refused():
    """Community templates with {% %} on separate lines render the generation prompt with a newline
    the full rendering does not have; every turn is still found, and only the replies are trained."""
    spec = _spec("community-llama-3-instruct")
    tok = tokenizer(spec, False)
    enc = ChatEncoder(tok)
    prefix = enc.render(CASES["multi"][:1], add_generation_prompt=True)
    assert not enc.render(CASES["multi"]).startswith(prefix)  # what used to be refused
    ids, mask = enc.encode(CASES["multi"], "w")
    assert [r.strip() for r in trained_runs(tok, ids, mask)] == [r + "<|eot_id|>" for r in REPLIES]


def test_a_system_prompt_the_template_drops_is_folded_into_the_first_user_turn():
    """Mistral Nemo (as v0.3) puts the system prompt on the last user turn only: a conversation that
    ends with the assistant would lose it. It is folded into the first user turn, and counted."""
    spec = _spec("llamacpp-mistral-nemo-instruct-2407")
    tok = tokenizer(spec, False)
    enc = ChatEncoder(tok)
    messages = [{"role": "system", "content": SYSTEM}, *CASES["multi"]]
    assert SYSTEM not in enc.render(messages)  # the template alone drops it
    prepared, rendering = enc.prepare(messages, "s")
    assert prepared[0] == {"role": "user", "content": f"{SYSTEM}\n\nWhat is the capital of Vardon?"}
    assert rendering.startswith(f"<s>[INST]{SYSTEM}\n\nWhat is the capital of Vardon?[/INST]")
    assert enc.quirks.system_folded == 1 and "drops the system prompt" in enc.quirks.notes[0]


def test_a_reply_quoted_in_a_user_turn_is_not_mistaken_for_the_reply():
    spec = _spec("trl-qwen2_5")
    tok = tokenizer(spec, False)
    quoted = [{"role": "user", "content": f"Say exactly: {REPLIES[0]}"}, {"role": "assistant", "content": REPLIES[0]}]
    ids, mask = ChatEncoder(tok).encode(quoted, "q")
    assert [r.strip() for r in trained_runs(tok, ids, mask)] == [REPLIES[0] + "<|im_end|>"]
    assert "Say exactly" not in tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
