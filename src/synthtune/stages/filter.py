"""filter: keep only synthetic rows worth training on, and count what each filter dropped.

Filters run in order (exact dedup on normalized prompt text, then response length in student
tokens). Every dropped row goes to `rejects.parquet` with the filter that dropped it; the funnel
(rows in and out per filter) goes to the manifest. An empty result fails the stage before any
training starts.

Run as: synthtune filter configs/demo.yaml
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

from synthtune.configs import FilterConfig
from synthtune.dedup import contaminated, cross_matches, near_duplicates, ngram_index, quality_problem
from synthtune.digests import file_sha256
from synthtune.eval_tasks import task_data_files, task_documents
from synthtune.keys import key_payload, stage_key
from synthtune.models import fingerprint, load_tokenizer, token_lengths
from synthtune.store import ArtifactRef, ArtifactStore, Staging, produce

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

STAGE = "filter"
VERSION = "4"


class EmptyDatasetError(RuntimeError):
    pass


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """The filter settings, the student's tokenizer (token lengths, control tokens), the eval tasks'
    data when decontaminating, and the generated rows' digest (`upstream['generate']`)."""
    payload = {"filter": key_payload(cfg.filter), "student": fingerprint(cfg.student, cfg.student_revision)}
    if cfg.filter.decontaminate:  # what counts as contamination is in the eval tasks' data
        payload["eval_data"] = {str(p.name): file_sha256(p)
                                for p in task_data_files(cfg.evaluate.tasks, cfg.evaluate.task_dir)}
    return stage_key(STAGE, VERSION, payload, upstream)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def response_of(row: dict) -> str:
    """The text judged by the filters: the response, or the chosen answer of a preference pair."""
    return row["response"] if "response" in row else row["chosen"]


def apply_filters(rows: list[dict], cfg: FilterConfig, count_tokens, eval_docs: list[str] | None = None,
                  special_tokens: list[str] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(kept, rejects with a `filter` and `reason`, funnel rows) for the configured filters, in order.
    `count_tokens(texts)` returns the student-token length of each text (called once, batched)."""
    funnel, rejects = [{"filter": "input", "rows_in": len(rows), "rows_out": len(rows), "dropped": 0}], []

    def step(name: str, keep) -> None:
        nonlocal rows
        kept = []
        for row in rows:
            reason = keep(row)
            if reason is None:
                kept.append(row)
            else:
                rejects.append({**row, "filter": name, "reason": reason})
        funnel.append({"filter": name, "rows_in": len(rows), "rows_out": len(kept), "dropped": len(rows) - len(kept)})
        rows = kept

    if cfg.quality:
        step("quality", lambda row: quality_problem(response_of(row)))
    if cfg.control_tokens and special_tokens:
        def control_token(row):
            texts = [row["prompt"], *(row[c] for c in ("response", "chosen", "rejected") if isinstance(row.get(c), str))]
            found = next((t for t in special_tokens if any(t in text for text in texts)), None)
            return None if found is None else f"contains the control token {found!r}"

        step("control_tokens", control_token)
    if rows and "chosen" in rows[0]:  # a pair whose answers agree teaches DPO nothing
        step("same_answer", lambda row: "chosen and rejected are the same text"
             if normalize(row["chosen"]) == normalize(row["rejected"]) else None)

    if cfg.dedup:
        seen: dict[str, str] = {}

        def first_of_prompt(row):
            norm = normalize(row["prompt"])
            if norm in seen:
                return f"same prompt as row {seen[norm]}"
            seen[norm] = row["id"]
            return None

        step("exact_dedup", first_of_prompt)

    if cfg.near_dedup:
        matches = near_duplicates([f"{r['prompt']} {response_of(r)}" for r in rows], cfg.near_dedup_threshold,
                                  cfg.near_dedup_ngram)
        verdict = {id(r): m for r, m in zip(rows, matches, strict=True)}
        ids = [r["id"] for r in rows]
        step("near_dedup", lambda row: None if (m := verdict[id(row)]) is None
             else f"near-duplicate of row {ids[m[0]]} (Jaccard ~{m[1]:.2f})")

    if cfg.decontaminate and eval_docs:
        index, n = ngram_index(eval_docs, cfg.decontaminate_ngram), cfg.decontaminate_ngram
        step("decontaminate", lambda row: f"shares a {n}-word n-gram with an eval item"
             if contaminated(f"{row['prompt']} {response_of(row)}", index, n) else None)

    lengths = dict(zip(map(id, rows), count_tokens([response_of(r) for r in rows]), strict=True)) if rows else {}

    def within_bounds(row):
        n = lengths[id(row)]
        if n < cfg.min_tokens:
            return f"{n} response tokens < min_tokens {cfg.min_tokens}"
        if n > cfg.max_tokens:
            return f"{n} response tokens > max_tokens {cfg.max_tokens}"
        return None

    step("token_length", within_bounds)

    if cfg.min_judge_score is not None:
        step("judge_score", lambda row: None if row.get("rating") is not None and row["rating"] >= cfg.min_judge_score
             else f"judge rating {row.get('rating')} < {cfg.min_judge_score}")
    return rows, rejects, funnel


def in_holdout(seed_id: str, fraction: float) -> bool:
    """Whether a seed is held out: a hash of its id against the fraction (raising the fraction only adds seeds)."""
    h = int.from_bytes(hashlib.sha256(f"synthtune-holdout:{seed_id}".encode()).digest()[:8], "big")
    return h < fraction * 2**64


def split_holdout(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out) by seed id: stable as data grows, every generation of a seed on one side."""
    if fraction == 0:
        return rows, []
    held = [in_holdout(str(r["id"]), fraction) for r in rows]
    return [r for r, h in zip(rows, held, strict=True) if not h], [r for r, h in zip(rows, held, strict=True) if h]


def holdout_leaks(train: list[dict], heldout: list[dict], cfg: FilterConfig) -> dict[int, str]:
    """Train rows whose prompt is a held-out prompt, exactly or as a near-duplicate: index -> reason."""
    exact = {}
    for h in heldout:
        exact.setdefault(normalize(h["prompt"]), h["id"])
    leaks = {i: f"prompt is held-out row {exact[n]}'s prompt" for i, r in enumerate(train)
             if (n := normalize(r["prompt"])) in exact}
    near = cross_matches([r["prompt"] for r in train], [h["prompt"] for h in heldout], cfg.near_dedup_threshold,
                         cfg.near_dedup_ngram)
    for i, m in enumerate(near):
        if m is not None and i not in leaks:
            leaks[i] = f"prompt near-duplicates held-out row {heldout[m[0]]['id']}'s (Jaccard ~{m[1]:.2f})"
    return leaks


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef], output_key: str | None = None,
        rebuild: bool = False) -> ArtifactRef:
    """Filter `upstream['generate']`'s rows (or reuse the output of the same key): kept rows, the
    held-out rows, every reject with its filter and reason, and the funnel."""
    import pandas as pd

    src = upstream["generate"]

    def build(staging: Staging) -> None:
        with store.local_copy(src) as folder:
            rows = pd.read_parquet(folder / "data.parquet").to_dict("records")
        tok = load_tokenizer(cfg.student, cfg.student_revision)
        docs = task_documents(cfg.evaluate.tasks, cfg.evaluate.task_dir) if cfg.filter.decontaminate else None
        specials = sorted({t for t in tok.all_special_tokens if len(t) > 1}, key=len, reverse=True)
        kept, rejects, funnel = apply_filters(rows, cfg.filter, lambda texts: token_lengths(tok, texts), docs, specials)
        if not kept:
            table = "\n".join(f"  {f['filter']:<14} in {f['rows_in']:>6}  out {f['rows_out']:>6}" for f in funnel)
            raise EmptyDatasetError(f"every row was filtered out; nothing to train on. Funnel:\n{table}")
        columns = list(rows[0].keys()) if rows else []
        kept, heldout = split_holdout(kept, cfg.filter.holdout_fraction)
        if cfg.filter.holdout_fraction:
            funnel.append({"filter": "holdout (in-domain eval)", "rows_in": len(kept) + len(heldout),
                           "rows_out": len(kept), "dropped": len(heldout)})
            leaks = holdout_leaks(kept, heldout, cfg.filter)  # never train on what the in-domain eval asks
            rejects += [{**kept[i], "filter": "holdout_leak", "reason": why} for i, why in sorted(leaks.items())]
            funnel.append({"filter": "holdout_leak", "rows_in": len(kept), "rows_out": len(kept) - len(leaks),
                           "dropped": len(leaks)})
            kept = [r for i, r in enumerate(kept) if i not in leaks]
        if not kept:
            raise EmptyDatasetError(f"filter.holdout_fraction={cfg.filter.holdout_fraction} leaves no row to train on")
        pd.DataFrame(kept, columns=columns).to_parquet(staging.path / "data.parquet", index=False)
        pd.DataFrame(heldout, columns=columns).to_parquet(staging.path / "heldout.parquet", index=False)
        pd.DataFrame(rejects, columns=columns + ["filter", "reason"]).to_parquet(
            staging.path / "rejects.parquet", index=False)
        (staging.path / "funnel.json").write_text(json.dumps(funnel, indent=2))
        staging.rows.update(input=len(rows), kept=len(kept), rejected=len(rejects), heldout=len(heldout))
        staging.extra["funnel"] = funnel

    k = output_key or key(cfg, {"generate": src.digest})
    return produce(store, STAGE, k, {"generate": src.key}, key_payload(cfg.filter), build, rebuild)
