"""template: apply the student's chat template, tokenize, build the loss mask, measure lengths.

The output is what the trainer consumes as is (`input_ids` plus `assistant_masks`), so training
never re-tokenizes differently. The assistant span is found by rendering the conversation with and
without the reply and diffing the prefixes; the end-of-turn token after the reply is trained.
Rows over `max_length` are dropped, truncated or refused, and always counted.

Run as: synthtune template configs/demo.yaml
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import Section, field
from synthtune.models import fingerprint, load_tokenizer

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "template"
VERSION = "1"
UPSTREAM = ("filter",)


class TemplateConfig(Section):
    max_length: int = field(1024, "Most tokens per templated conversation (TRL's `max_length`).", ge=8)
    truncation: Literal["drop", "truncate", "error"] = field(
        "drop",
        "Rows over max_length: `drop` them, `truncate` them (rows left with no trained token are dropped), "
        "or fail with `error`. Every case is counted in the report.",
    )
    system_prompt: str | None = field(None, "System prompt put in front of every training conversation.")


class TemplateError(ValueError):
    pass


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    payload = {"template": key_payload(cfg.template), "student": fingerprint(cfg.student)}
    return stage_key(STAGE, VERSION, payload, upstream)


def encode_row(tok, prompt: str, response: str, system_prompt: str | None) -> tuple[list[int], list[int], int]:
    """(input_ids, assistant mask, prompt length) of one single-turn conversation."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TemplateError("the chat template renders the prompt differently once the reply is added; "
                            "cannot locate the assistant span")
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids), len(prompt_ids)


def percentiles(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 95, 99)} | {"max": int(arr.max())}


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    import pandas as pd

    src, tc = upstream["filter"], cfg.template

    def build(staging: Staging) -> None:
        tok = load_tokenizer(cfg.student)
        if not tok.chat_template:
            raise TemplateError(f"student '{cfg.student}' has no chat template; add one to its tokenizer_config.json")
        with store.local_copy(src) as folder:
            rows = pd.read_parquet(folder / "data.parquet").to_dict("records")
        out, over, dropped, cut = [], [], 0, 0
        lengths = {"prompt": [], "completion": [], "total": []}
        for row in rows:
            ids, mask, n_prompt = encode_row(tok, row["prompt"], row["response"], tc.system_prompt)
            lengths["prompt"].append(n_prompt)
            lengths["completion"].append(len(ids) - n_prompt)
            lengths["total"].append(len(ids))
            if len(ids) > tc.max_length:
                over.append({"id": row["id"], "tokens": len(ids)})
                if tc.truncation == "error":
                    raise TemplateError(f"row {row['id']}: {len(ids)} tokens > template.max_length {tc.max_length} "
                                        "(template.truncation=error)")
                if tc.truncation == "drop" or sum(mask[: tc.max_length]) == 0:
                    dropped += 1  # a truncated reply with no trained token left teaches nothing
                    continue
                ids, mask, cut = ids[: tc.max_length], mask[: tc.max_length], cut + 1
            out.append({"id": row["id"], "input_ids": ids, "assistant_masks": mask})
        if not out:
            raise TemplateError(f"no row fits template.max_length={tc.max_length}: {len(over)} over the limit")
        trained = sum(sum(r["assistant_masks"]) for r in out)
        total = sum(len(r["input_ids"]) for r in out)
        report = {
            "rows_in": len(rows), "rows_out": len(out), "over_max_length": len(over), "dropped": dropped,
            "truncated": cut, "trained_token_share": trained / total,
            "worst_rows": sorted(over, key=lambda r: -r["tokens"])[:10],
            "lengths": {k: percentiles(v) for k, v in lengths.items()},
        }
        pd.DataFrame(out).to_parquet(staging.path / "data.parquet", index=False)
        (staging.path / "report.json").write_text(json.dumps(report, indent=2))
        staging.rows.update(input=len(rows), output=len(out), dropped=dropped, truncated=cut)
        staging.metrics.update(trained_token_share=round(trained / total, 4), p99_tokens=report["lengths"]["total"]["p99"])

    ups = {"filter": src.key}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(tc), build)
