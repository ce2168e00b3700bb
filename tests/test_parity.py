"""Format parity: lm-eval scores the format the template stage trains, with real chat templates from
tests/templates/ (Qwen3's empty think block, Mistral's space before a reply, Gemma's refused system
role) and a Llama 3.2 template that prints today's date."""

from __future__ import annotations

import datetime as dt

import pytest

from synthtune import parity
from synthtune.config import load_config
from synthtune.stages import preflight, template
from tests.conftest import DEMO
from tests.support.template_corpus import SPECS, make_tokenizer

SPEC = {s.file: s for s in SPECS}
SYSTEM = "Answer in one full sentence."


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load_config(DEMO, [f"artifact_root={tmp_path_factory.mktemp('parity')}"])


def _cfg(cfg, template_=None, evaluate=None):
    return cfg.model_copy(update={"template": cfg.template.model_copy(update=template_ or {}),
                                  "evaluate": cfg.evaluate.model_copy(update=evaluate or {})})


def _findings(cfg, file: str):
    tok = make_tokenizer(SPEC[file], adds_bos=False)
    enc = parity.encoder(cfg, tok)
    return parity.check(cfg, enc, parity.eval_template(enc), cfg.evaluate.task_dir, limit=2)


def test_qwen3_think_block_is_caught_and_chat_template_kwargs_make_both_render_alike(demo):
    found = _findings(demo, "trl-qwen3.jinja")
    assert [f.task for f in found] == ["demo_facts", "demo_facts"]
    assert "<think>" in found[0].train and "<think>" not in found[0].eval
    assert "from token" in found[0].detail and "trained" in found[0].detail  # token by token around the difference
    # the same variables for training and evaluation: Qwen3 puts the empty block in the generation prompt too
    assert _findings(_cfg(demo, {"chat_template_kwargs": {"enable_thinking": False}}), "trl-qwen3.jinja") == []


def test_mistral_space_before_the_reply_is_caught_for_a_task_and_matched_for_in_domain(demo, tmp_path):
    found = _findings(demo, "hub-mistral-7b-instruct-v0.1.jinja")
    assert found and found[0].task == "demo_facts"
    assert "[/INST] The capital" in found[0].train and "[/INST]The capital" in found[0].eval
    assert "The template puts ' ' before a reply" in found[0].detail  # and what to do about it
    # lm-eval drops target_delimiter for multiple choice under a chat template: choices that carry the
    # template's space render as trained
    import json

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for f in (demo.evaluate.task_dir).iterdir():
        if f.suffix == ".jsonl":
            rows = [json.loads(line) for line in f.read_text().splitlines()]
            f_text = "".join(json.dumps({**r, "choices": [" " + c for c in r["choices"]]}) + "\n" for r in rows)
            (tasks / f.name).write_text(f_text)
        else:
            (tasks / f.name).write_text(f.read_text())
    assert _findings(_cfg(demo, evaluate={"task_dir": tasks}), "hub-mistral-7b-instruct-v0.1.jinja") == []
    # the in-domain task is ours: its delimiter is what the template puts before a reply
    in_domain = _cfg(demo, evaluate={"task_dir": tasks, "in_domain": True})
    assert _findings(in_domain, "hub-mistral-7b-instruct-v0.1.jinja") == []
    enc = parity.encoder(demo, make_tokenizer(SPEC["hub-mistral-7b-instruct-v0.1.jinja"], adds_bos=False))
    assert parity.reply_delimiter(enc, parity.eval_template(enc)) == " "


def test_gemma_system_prompt_is_folded_for_evaluation_and_serving_as_for_training(demo):
    both = _cfg(demo, {"system_prompt": SYSTEM}, {"system_instruction": SYSTEM})
    assert _findings(both, "trl-gemma.jinja") == []  # the evaluation template folds it as training does
    tok = make_tokenizer(SPEC["trl-gemma.jinja"], adds_bos=False)
    served = parity.eval_template(parity.encoder(both, tok))
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"}],
                                   chat_template=served, tokenize=False, add_generation_prompt=True)
    assert f"<start_of_turn>user\n{SYSTEM}\n\nHi?<end_of_turn>" in text
    # the adapter's saved template (what a server loads) is checked against training the same way
    saved = make_tokenizer(SPEC["trl-gemma.jinja"], adds_bos=False)
    saved.chat_template = served
    assert parity.serving_check(both, saved, tok)["same_as_training"]
    raw = make_tokenizer(SPEC["trl-gemma.jinja"], adds_bos=False)  # as published: refuses the system role
    check = parity.serving_check(both, raw, raw)
    assert not check["same_as_training"] and "a server would prompt the model" in check["problems"][0]
    # lm-eval's own fallback (the tokenizer's template, which refuses the role) drops the prompt: caught
    enc = parity.encoder(both, tok)
    found = parity.check(both, enc, enc.template, both.evaluate.task_dir, limit=1)
    assert found and SYSTEM in found[0].train and SYSTEM not in found[0].eval
    # trained with a system prompt, evaluated without one: caught
    found = _findings(_cfg(demo, {"system_prompt": SYSTEM}), "trl-gemma.jinja")
    assert found and SYSTEM in found[0].train


def test_a_dated_template_renders_the_same_on_two_days_and_the_key_follows_date_string(demo, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    tok = make_tokenizer(SPEC["trl-llama3_2.jinja"], adds_bos=False)
    conversation = [{"role": "user", "content": "What is the capital of Vardon?"},
                    {"role": "assistant", "content": "The capital of Vardon is Quellis."}]

    def on(day: dt.datetime):
        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return day

        monkeypatch.setattr(ctu, "datetime", Clock)
        raw = tok.apply_chat_template(conversation, tokenize=False)
        return raw, parity.encoder(demo, tok).render(conversation)

    raw1, pinned1 = on(dt.datetime(2026, 12, 3))
    raw2, pinned2 = on(dt.datetime(2026, 12, 4))
    assert raw1 != raw2 and "03 Dec 2026" in raw1  # the template as published reads the clock
    assert pinned1 == pinned2 and "Today Date: 26 Jul 2024" in pinned1
    other = _cfg(demo, {"date_string": "01 Jan 2027"})
    assert "Today Date: 01 Jan 2027" in parity.encoder(other, tok).render(conversation)
    assert template.key(demo, {"filter": "x"}) != template.key(other, {"filter": "x"})
    assert parity.template_variables(demo.template, "no date here") == {}


def test_preflight_names_the_task_and_allow_format_difference_reports_it(demo, tmp_path):
    folder = tmp_path / "qwen3-student"
    make_tokenizer(SPEC["trl-qwen3.jinja"], adds_bos=False).save_pretrained(folder)
    cfg = demo.model_copy(update={"student": str(folder)})
    errors, report = preflight.format_parity(cfg)
    assert errors and errors[0].startswith("format parity: eval task demo_facts (item f00)")
    assert "evaluate.allow_format_difference" in errors[0] and len(report["differences"]) == 3
    errors, report = preflight.format_parity(_cfg(cfg, evaluate={"allow_format_difference": True}))
    assert errors == [] and report["acknowledged"] and report["differences"] and report["unchecked"] == []


def test_the_demo_template_renders_training_and_evaluation_alike(demo, tiny_tokenizer):
    enc = parity.encoder(demo, tiny_tokenizer)
    assert parity.eval_template(enc) == tiny_tokenizer.chat_template  # nothing to pin, nothing to fold
    assert parity.check(demo, enc, parity.eval_template(enc), demo.evaluate.task_dir) == []
    assert parity.chat_template_args(demo, tiny_tokenizer) == {}
