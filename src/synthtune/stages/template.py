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

import contextlib
import gc
import json
import logging
import os
from typing import TYPE_CHECKING

from synthtune import parity
from synthtune.chat import CHUNK, ChatEncoder, RowError, TemplateError, to_messages
from synthtune.configs import TemplateConfig
from synthtune.keys import key_payload, stage_key
from synthtune.models import fingerprint, load_tokenizer
from synthtune.store import ArtifactRef, ArtifactStore, Staging, produce
from synthtune.versions import stage_libs

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

STAGE = "template"
PREVIEW = 5  # rows kept in preview.json
VERSION = "3"
log = logging.getLogger("synthtune.template")

__all__ = ["TemplateConfig", "TemplateError", "run", "key"]


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """The template settings, the student (its fingerprint hashes its tokenizer files, chat template
    included), tokenizers and transformers major.minor, and the filtered rows' digest."""
    payload = {"template": key_payload(cfg.template), "libs": stage_libs(STAGE),
               "student": fingerprint(cfg.student, cfg.student_revision)}
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


@contextlib.contextmanager
def _no_cyclic_gc():
    """The cyclic garbage collector paused: a million rows of token lists hold no reference cycles, and
    its passes over the growing heap cost a quarter of the encoding time (bench/template.py)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def encode_rows(enc: ChatEncoder, rows: list[dict], preference: bool):
    """(row id, its token ids, or the RowError that quarantines it) for every row, in order.

    SFT rows take the fast path: the main thread renders and lays out a chunk of rows while worker
    threads tokenize the chunks before it (the Rust tokenizer releases the GIL), so rendering,
    tokenizing and masking overlap across the machine's cores. Preference rows are encoded one by one."""
    chunks = [[(str(row.get("id", start + n)), row) for n, row in enumerate(rows[start:start + CHUNK])]
              for start in range(0, len(rows), CHUNK)]
    if preference:
        for chunk in chunks:
            for row_id, row in chunk:
                try:
                    yield row_id, enc.encode_preference(row, row_id)
                except RowError as e:
                    yield row_id, e
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    # one more tokenizing thread than cores: the Rust call holds the GIL for part of its work (measured:
    # 3 threads beat 2 on a 2-core box by ~10%)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(2, min(8, cores + 1))
    pending: deque = deque()

    def finish():
        chunk, slots, future = pending.popleft()
        encoded = iter(enc.masks([s for s in slots if not isinstance(s, RowError)], future.result()))
        for (row_id, _), slot in zip(chunk, slots, strict=True):
            yield row_id, slot if isinstance(slot, RowError) else next(encoded)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synthtune-tokenize") as pool, _no_cyclic_gc():
        for chunk in chunks:
            slots: list = []
            for row_id, row in chunk:
                try:
                    slots.append(enc.layout(to_messages(row), row_id))
                except RowError as e:
                    slots.append(e)
            texts = [s.text for s in slots if not isinstance(s, RowError)]
            pending.append((chunk, slots, pool.submit(enc.tokenize_texts, texts)))
            while len(pending) > workers:
                yield from finish()
        while pending:
            yield from finish()


def _template(cfg: PipelineConfig, staging: Staging, rows: list[dict]) -> None:
    import pandas as pd

    tc = cfg.template
    tok = load_tokenizer(cfg.student, cfg.student_revision)
    enc = parity.encoder(cfg, tok)
    preference = bool(rows) and "chosen" in rows[0]
    out, quarantined, lengths = [], [], _Lengths()
    for row_id, encoded in encode_rows(enc, rows, preference):
        if isinstance(encoded, RowError):
            quarantined.append({"id": row_id, "reason": str(encoded)})
        elif preference:
            lengths.add(len(encoded[0]), max(len(encoded[1]), len(encoded[2])))
            if fitted := _fit_preference(*encoded, tc, row_id, lengths):
                out.append({"id": row_id, "prompt_ids": fitted[0], "chosen_ids": fitted[1], "rejected_ids": fitted[2]})
        else:
            ids, mask = encoded
            first = mask.index(1)
            lengths.add(first, len(ids) - first)
            if fitted := _fit_sft(ids, mask, tc, row_id, lengths):
                out.append({"id": row_id, "input_ids": fitted[0], "assistant_masks": fitted[1]})
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
        "system_merged": enc.quirks.system_merged, "system_folded": enc.quirks.system_folded,
        "double_bos_removed": enc.quirks.double_bos_removed,
        "trained_token_share": round(trained / total, 4),
        "worst_rows": sorted(lengths.over, key=lambda r: -r["tokens"])[:10],
        "lengths": {"train": stats},
        "warnings": warnings,
    }
    pd.DataFrame(out).to_parquet(staging.path / "data.parquet", index=False)
    if not preference:  # what the first rows train on, for people (the Prefect preview, `synthtune template --show`)
        (staging.path / "preview.json").write_text(json.dumps(
            [{"id": r["id"], "segments": segments(tok, r["input_ids"], r["assistant_masks"])} for r in out[:PREVIEW]],
            indent=1))
    pd.DataFrame(quarantined, columns=["id", "reason"]).to_parquet(staging.path / "quarantine.parquet", index=False)
    (staging.path / "report.json").write_text(json.dumps(report, indent=2))
    histogram(lengths.parts, staging.path / "lengths.png",
              f"{cfg.name}: token lengths (train split, max_length {tc.max_length})", tc.max_length)
    staging.rows.update(input=len(rows), output=len(out), quarantined=len(quarantined), dropped=lengths.dropped,
                        truncated=lengths.truncated, dropped_no_trained_token=lengths.dropped_no_trained)
    staging.metrics.update(trained_token_share=report["trained_token_share"], p99_tokens=stats["total"]["p99"],
                           warnings=warnings)
    staging.extra["report"] = report


def segments(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """A templated row as (text, trained?) runs, for people to read what the loss is on."""
    out: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            out.append((tokenizer.decode(ids[start:t]), bool(mask[start])))
            start = t
    return out


def preview(cfg: PipelineConfig, folder, n: int) -> list[tuple[str, list[tuple[str, bool]]]]:
    """(row id, segments) of the first n SFT rows of a template output folder."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"{folder}/data.parquet")
    if "input_ids" not in table.column_names or n <= 0:
        return []
    tok = load_tokenizer(cfg.student, cfg.student_revision)
    rows = table.slice(0, n).to_pylist()
    return [(r["id"], segments(tok, r["input_ids"], r["assistant_masks"])) for r in rows]


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef], output_key: str | None = None,
        rebuild: bool = False) -> ArtifactRef:
    """Render, tokenize and mask `upstream['filter']`'s kept rows (or reuse the output of the same key)."""
    import pandas as pd

    src = upstream["filter"]

    def build(staging: Staging) -> None:
        with store.local_copy(src) as folder:
            rows = pd.read_parquet(folder / "data.parquet").to_dict("records")
        _template(cfg, staging, rows)

    k = output_key or key(cfg, {"filter": src.digest})
    return produce(store, STAGE, k, {"filter": src.key}, key_payload(cfg.template), build, rebuild)
