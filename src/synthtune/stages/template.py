"""template: apply the student's chat template, tokenize, build the loss mask, measure lengths.

The output is what the trainer consumes as is, so training never re-tokenizes differently:
SFT rows become `input_ids` + `assistant_masks` (content and end-of-turn of every assistant turn,
see synthtune.chat); preference rows become TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`,
with the prompt budget (`max_prompt_length`) enforced here since TRL 1.x has none. Rows over the
limits are dropped, truncated or refused, and always counted; malformed rows are quarantined with
the reason. The report (percentiles, histogram PNG, worst rows, warnings) lands in the manifest.

Run as: synthtune template configs/demo.yaml
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Literal

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.chat import ChatEncoder, RowError, TemplateError, to_messages
from synthtune.fields import InputFile, Section, field
from synthtune.models import fingerprint, load_tokenizer

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "template"
VERSION = "2"
log = logging.getLogger("synthtune.template")

__all__ = ["TemplateConfig", "TemplateError", "run", "key"]


class TemplateConfig(Section):
    max_length: int = field(1024, "Most tokens per templated row (TRL's `max_length`).", ge=8)
    max_prompt_length: int | None = field(
        None, "Preference data: most prompt tokens (TRL 1.x has no such limit; it is enforced here). "
        "None: half of max_length.", ge=1)
    truncation: Literal["drop", "truncate", "error"] = field(
        "drop",
        "Rows over the limits: `drop` them, `truncate` them (keep the start of a reply, the end of a prompt; rows "
        "left with no trained token are dropped), or fail with `error`. Every case is counted in the report.",
    )
    system_prompt: str | None = field(None, "System prompt put in front of every conversation.")
    chat_template: InputFile | None = field(
        None, "A Jinja chat template file used instead of the tokenizer's (its contents are in the cache key).")
    warn_cut_share: float = field(
        0.01, "Above this share of rows cut or dropped for length, the report warns loudly.", ge=0, le=1,
        affects_output=False)


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    # the student fingerprint hashes its tokenizer files, chat template included
    payload = {"template": key_payload(cfg.template), "student": fingerprint(cfg.student)}
    return stage_key(STAGE, VERSION, payload, upstream)


def percentiles(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 95, 99)} | {"max": int(arr.max()), "n": len(values)}


class _Lengths:
    """Token lengths per part, and what the limits did to rows."""

    def __init__(self) -> None:
        self.parts: dict[str, list[int]] = {"prompt": [], "completion": [], "total": []}
        self.over: list[dict] = []
        self.dropped = self.truncated = self.dropped_no_trained = 0

    def add(self, prompt: int, completion: int) -> None:
        self.parts["prompt"].append(prompt)
        self.parts["completion"].append(completion)
        self.parts["total"].append(prompt + completion)


def _fit_sft(ids: list[int], mask: list[int], tc: TemplateConfig, row_id: str, lengths: _Lengths):
    """The row within max_length per the policy, or None when dropped."""
    if len(ids) <= tc.max_length:
        return ids, mask
    lengths.over.append({"id": row_id, "tokens": len(ids)})
    if tc.truncation == "error":
        raise TemplateError(f"row {row_id}: {len(ids)} tokens > template.max_length {tc.max_length} "
                            "(template.truncation=error); raise the limit or choose drop/truncate")
    if tc.truncation == "drop":
        lengths.dropped += 1
        return None
    if not any(mask[: tc.max_length]):  # a reply cut to nothing would train an empty target
        lengths.dropped_no_trained += 1
        return None
    lengths.truncated += 1
    return ids[: tc.max_length], mask[: tc.max_length]


def _fit_preference(prompt: list[int], chosen: list[int], rejected: list[int], tc: TemplateConfig, row_id: str,
                    lengths: _Lengths):
    budget = tc.max_prompt_length or tc.max_length // 2
    longest = len(prompt) + max(len(chosen), len(rejected))
    if len(prompt) <= budget and longest <= tc.max_length:
        return prompt, chosen, rejected
    lengths.over.append({"id": row_id, "tokens": longest, "prompt_tokens": len(prompt)})
    if tc.truncation == "error":
        raise TemplateError(f"row {row_id}: prompt {len(prompt)} tokens (budget {budget}) / total {longest} tokens "
                            f"(max_length {tc.max_length}) with template.truncation=error")
    if tc.truncation == "drop":
        lengths.dropped += 1
        return None
    prompt = prompt[-budget:]  # keep the end of the prompt: the turn being answered
    room = tc.max_length - len(prompt)
    if room <= 0:
        lengths.dropped_no_trained += 1
        return None
    lengths.truncated += 1
    return prompt, chosen[:room], rejected[:room]


def histogram(parts: dict[str, list[int]], path, title: str, max_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (name, values) in zip(axes, parts.items(), strict=True):
        lo, hi = min(values), max(values)
        bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < 50 else 50  # whole tokens when the range is small
        ax.hist(values, bins=bins, color="#4c72b0")
        if name == "total":
            ax.axvline(np.percentile(values, 99), color="#dd8452", linestyle="--", label="p99")
            if hi >= max_length:
                ax.axvline(max_length, color="#c44e52", label="max_length")
            ax.legend()
        ax.set_title(f"{name} tokens")
        ax.set_xlabel("tokens")
    axes[0].set_ylabel("rows")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _template(cfg: PipelineConfig, staging: Staging, rows: list[dict]) -> None:
    import pandas as pd

    tc = cfg.template
    tok = load_tokenizer(cfg.student)
    template_text = tc.chat_template.read_text() if tc.chat_template else None
    enc = ChatEncoder(tok, template_text, tc.system_prompt)
    preference = bool(rows) and "chosen" in rows[0]
    out, quarantined, lengths = [], [], _Lengths()
    for row in rows:
        row_id = str(row.get("id", len(out) + len(quarantined)))
        try:
            if preference:
                fitted = enc.encode_preference(row, row_id)
                lengths.add(len(fitted[0]), max(len(fitted[1]), len(fitted[2])))
                fitted = _fit_preference(*fitted, tc, row_id, lengths)
                if fitted:
                    out.append({"id": row_id, "prompt_ids": fitted[0], "chosen_ids": fitted[1], "rejected_ids": fitted[2]})
            else:
                ids, mask = enc.encode(to_messages(row), row_id)
                first = mask.index(1)
                lengths.add(first, len(ids) - first)
                fitted = _fit_sft(ids, mask, tc, row_id, lengths)
                if fitted:
                    out.append({"id": row_id, "input_ids": fitted[0], "assistant_masks": fitted[1]})
        except RowError as e:
            quarantined.append({"id": row_id, "reason": str(e)})
    if not out:
        raise TemplateError(f"no usable row: {len(rows)} in, {len(quarantined)} quarantined "
                            f"({quarantined[:3]}), {len(lengths.over)} over the length limits")

    n_in = len(rows) - len(quarantined)
    cut = lengths.dropped + lengths.truncated + lengths.dropped_no_trained
    stats = {k: percentiles(v) for k, v in lengths.parts.items()}
    warnings = list(enc.quirks.notes)
    if n_in and cut / n_in > tc.warn_cut_share:
        need = int(stats["total"]["p99"]) + 1
        warnings.append(f"{cut} of {n_in} rows ({cut / n_in:.1%}) were cut or dropped by max_length {tc.max_length}; "
                        f"template.max_length={need} covers p99 of this data")
    for w in warnings:
        log.warning(w)
    if preference:
        trained = sum(len(r["chosen_ids"]) for r in out)
        total = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in out)
    else:
        trained = sum(sum(r["assistant_masks"]) for r in out)
        total = sum(len(r["input_ids"]) for r in out)
    report = {
        "kind": "preference" if preference else "sft",
        "rows_in": len(rows), "rows_out": len(out), "quarantined": len(quarantined),
        "over_limits": len(lengths.over), "dropped": lengths.dropped, "truncated": lengths.truncated,
        "dropped_no_trained_token": lengths.dropped_no_trained,
        "system_merged": enc.quirks.system_merged, "double_bos_removed": enc.quirks.double_bos_removed,
        "trained_token_share": round(trained / total, 4),
        "worst_rows": sorted(lengths.over, key=lambda r: -r["tokens"])[:10],
        "lengths": {"train": stats},
        "warnings": warnings,
    }
    pd.DataFrame(out).to_parquet(staging.path / "data.parquet", index=False)
    pd.DataFrame(quarantined, columns=["id", "reason"]).to_parquet(staging.path / "quarantine.parquet", index=False)
    (staging.path / "report.json").write_text(json.dumps(report, indent=2))
    histogram(lengths.parts, staging.path / "lengths.png",
              f"{cfg.name}: token lengths (train split, max_length {tc.max_length})", tc.max_length)
    staging.rows.update(input=len(rows), output=len(out), quarantined=len(quarantined), dropped=lengths.dropped,
                        truncated=lengths.truncated, dropped_no_trained_token=lengths.dropped_no_trained)
    staging.metrics.update(trained_token_share=report["trained_token_share"], p99_tokens=stats["total"]["p99"],
                           warnings=warnings)
    staging.extra["report"] = report


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    import pandas as pd

    src = upstream["filter"]

    def build(staging: Staging) -> None:
        with store.local_copy(src) as folder:
            rows = pd.read_parquet(folder / "data.parquet").to_dict("records")
        _template(cfg, staging, rows)

    ups = {"filter": src.key}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(cfg.template), build)
