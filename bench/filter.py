"""Exact + near-duplicate filtering over 100k synthetic rows: synthtune's filter against a plain
datasketch MinHashLSH loop, side by side in one process.

Run as: .venv/bin/python -m bench.filter [--rows 100000] [--stage-rows 1000000]

The corpus (tests/support/synthetic_text.py) has 80% distinct rows of 50 words, 10% exact copies and 10%
near-duplicates (two single-word substitutions). Both sides: exact dedup on the normalized text,
then MinHash (128 permutations, word 3-gram shingles) LSH at Jaccard 0.7, keeping the first row of
each cluster. The baseline is the textbook loop: one `datasketch.MinHash` per row, `lsh.query`,
then `lsh.insert` for rows kept. Printed: seconds, rows/s, the speed ratio (target >= 3x) and the
recall of the planted near-duplicates for each side.

`--stage-rows N` also times the whole filter stage as a night runs it (`filter.run` on a generate
output of N rows: parquet in and out, every filter of the demo config with the student's real
tokenizer, decontamination against the demo eval task, a 5% holdout and its leak check), since the
stage reads the whole accumulated set every night.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def datasketch_loop(rows: list[dict], threshold: float = 0.7, num_perm: int = 128) -> set[str]:
    from datasketch import MinHash, MinHashLSH

    from synthtune.dedup import shingles
    from synthtune.stages.filter import normalize

    lsh, seen, dropped = MinHashLSH(threshold=threshold, num_perm=num_perm), set(), set()
    for row in rows:
        text = f"{row['prompt']} {row['response']}"
        norm = normalize(text)
        if norm in seen:
            dropped.add(row["id"])
            continue
        seen.add(norm)
        m = MinHash(num_perm=num_perm, seed=0)
        m.update_batch([s.encode() for s in shingles(text, 3)])
        if lsh.query(m):
            dropped.add(row["id"])
        else:
            lsh.insert(row["id"], m)
    return dropped


def ours(rows: list[dict]) -> set[str]:
    from synthtune.stages.filter import FilterConfig, apply_filters

    cfg = FilterConfig(quality=False, dedup=True, near_dedup=True, decontaminate=False)
    _, rejects, _ = apply_filters(rows, cfg, lambda texts: [2] * len(texts))
    return {r["id"] for r in rejects}


def recall(dropped: set[str], near: set[str]) -> float:
    """Share of planted near-duplicates dropped (sources come first, so the copy is the one to drop)."""
    return len(dropped & near) / len(near)


def stage_at_scale(n: int) -> None:
    """The filter stage's own `run` over a generate output of n rows (the nightly code path)."""
    import tempfile

    import pandas as pd
    from tests.synthetic_text import corpus

    from synthtune.config import load_config
    from synthtune.stages import filter
    from synthtune.store import ArtifactStore, produce

    rows, _, _ = corpus(n_base=int(n * 0.8), n_near=n // 10, n_exact=n // 10)
    with tempfile.TemporaryDirectory(prefix="synthtune-bench-filter-") as tmp:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
            f"artifact_root={tmp}", "filter.max_tokens=10000", "filter.holdout_fraction=0.05"])
        store = ArtifactStore(cfg.artifact_root)
        generated = produce(store, "generate", "bench", {}, {}, lambda st: pd.DataFrame(rows).to_parquet(
            st.path / "data.parquet", index=False))
        start = time.perf_counter()
        ref = filter.run(cfg, store, {"generate": generated})
        secs = time.perf_counter() - start
    r = ref.summary["rows"]
    print(f"filter stage (filter.run) on {n:,} rows: {secs:.0f} s ({n / secs:,.0f} rows/s); kept {r['kept']:,}, "
          f"rejected {r['rejected']:,}, held out {r['heldout']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--stage-rows", type=int, default=0, help="also time the whole stage on this many rows")
    args = parser.parse_args()
    from tests.synthetic_text import corpus

    n = args.rows
    rows, near, exact = corpus(n_base=int(n * 0.8), n_near=n // 10, n_exact=n // 10)
    # sources first, so "keep the first of a cluster" keeps the source on both sides and recall is comparable
    rows.sort(key=lambda r: (r["id"][0] != "b", r["id"]))

    start = time.perf_counter()
    ours_dropped = ours(rows)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    base_dropped = datasketch_loop(rows)
    base_s = time.perf_counter() - start

    print(f"{'path':<36}{'seconds':>9}{'rows/s':>10}{'near-dup recall':>17}{'exact caught':>14}")
    for name, secs, dropped in (("synthtune filter (rensa + numpy LSH)", ours_s, ours_dropped),
                                ("datasketch MinHashLSH loop", base_s, base_dropped)):
        print(f"{name:<36}{secs:>9.1f}{len(rows) / secs:>10.0f}{recall(dropped, near):>17.3f}"
              f"{len(dropped & exact) / len(exact):>14.3f}")
    print(f"speed ratio: {base_s / ours_s:.1f}x (target >= 3x); rows={len(rows)}, "
          f"false drops: ours {len(ours_dropped - near - exact)}, datasketch {len(base_dropped - near - exact)}")
    if args.stage_rows:
        stage_at_scale(args.stage_rows)


if __name__ == "__main__":
    main()
