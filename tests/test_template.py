"""template: the loss mask covers exactly the assistant reply and its end-of-turn; lengths counted."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from synthtune.artifacts import ArtifactStore, produce
from synthtune.stages import template
from synthtune.stages.template import TemplateError, encode_row


def test_mask_is_the_reply_plus_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask, n_prompt = encode_row(tok, "What is the capital of Vardon?", "The capital of Vardon is Quellis.", None)
    assert len(ids) == len(mask) and mask[:n_prompt] == [0] * n_prompt and all(mask[n_prompt:])
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained.startswith("The capital of Vardon is Quellis.<|im_end|>")
    # the whole row renders exactly as the tokenizer's own chat template
    full = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Vardon?"},
                                    {"role": "assistant", "content": "The capital of Vardon is Quellis."}], tokenize=False)
    assert tok.decode(ids) == full
    assert tok.convert_tokens_to_ids("<|im_end|>") in [i for i, m in zip(ids, mask, strict=True) if m]


def test_system_prompt_is_in_the_untrained_prefix(tiny_tokenizer):
    ids, mask, n_prompt = encode_row(tiny_tokenizer, "hi", "hello", "Be brief.")
    assert "Be brief." in tiny_tokenizer.decode(ids[:n_prompt])
    assert "Be brief." not in tiny_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


def _filter_output(store, rows):
    return produce(store, "filter", "f" + str(abs(hash(json.dumps(rows))) % 10**8), {}, {},
                   lambda st: pd.DataFrame(rows).to_parquet(st.path / "data.parquet"))


ROWS = [
    {"id": "short", "prompt": "hi", "response": "hello"},
    {"id": "long_answer", "prompt": "hi", "response": " ".join(["The capital of Vardon is Quellis."] * 6)},
    {"id": "long_prompt", "prompt": " ".join(["What is the capital of Vardon?"] * 8), "response": "ok"},
]


@pytest.mark.parametrize("policy, kept, dropped, truncated", [
    ("drop", ["short"], 2, 0),
    # a cut reply still has trained tokens; a prompt that fills max_length leaves none: dropped, never empty
    ("truncate", ["short", "long_answer"], 1, 1),
])
def test_over_length_policy_is_counted(demo_cfg, policy, kept, dropped, truncated):
    cfg = demo_cfg.model_copy(update={"template": demo_cfg.template.model_copy(
        update={"max_length": 40, "truncation": policy})})
    store = ArtifactStore(cfg.artifact_root)
    ref = template.run(cfg, store, {"filter": _filter_output(store, ROWS)})
    out = pd.read_parquet(f"{ref.uri}/data.parquet")
    assert list(out["id"]) == kept
    assert all(len(ids) <= 40 and sum(m) > 0 for ids, m in zip(out["input_ids"], out["assistant_masks"], strict=True))
    report = json.loads(open(f"{ref.uri}/report.json").read())
    assert (report["dropped"], report["truncated"], report["over_max_length"]) == (dropped, truncated, 2)
    assert report["worst_rows"][0]["id"] in ("long_answer", "long_prompt")


def test_error_policy_names_the_row(demo_cfg):
    cfg = demo_cfg.model_copy(update={"template": demo_cfg.template.model_copy(
        update={"max_length": 40, "truncation": "error"})})
    store = ArtifactStore(cfg.artifact_root)
    with pytest.raises(TemplateError, match=r"row long_answer: \d+ tokens > template.max_length 40"):
        template.run(cfg, store, {"filter": _filter_output(store, ROWS)})
    assert not list((store.root and __import__("pathlib").Path(store.root) / "template").glob("*/manifest.json"))
