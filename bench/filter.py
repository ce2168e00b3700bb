"""Exact + near-duplicate filtering over 100k synthetic rows: synthtune's filter against a plain
datasketch MinHashLSH loop, side by side in one process.

Run as: .venv/bin/python bench/filter.py [--rows 100000]

The corpus (tests/synthetic_text.py) has 80% distinct rows of 50 words, 10% exact copies and 10%
near-duplicates (two single-word substitutions). Both sides: exact dedup on the normalized text,
then MinHash (128 permutations, word 3-gram shingles) LSH at Jaccard 0.7, keeping the first row of
each cluster. The baseline is the textbook loop: one `datasketch.MinHash` per row, `lsh.query`,
then `lsh.insert` for rows kept. Printed: seconds, rows/s, the speed ratio (target >= 3x) and the
recall of the planted near-duplicates for each side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    _, rejects, _ = apply_filters(rows, cfg, lambda text: 2)
    return {r["id"] for r in rejects}


def recall(dropped: set[str], near: set[str]) -> float:
    """Share of planted near-duplicates dropped (sources come first, so the copy is the one to drop)."""
    return len(dropped & near) / len(near)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
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


if __name__ == "__main__":
    main()
