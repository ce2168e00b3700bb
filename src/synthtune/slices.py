"""Per-slice comparison: a task group's subtasks and a task's data slices, each with a paired test and a
Holm–Bonferroni correction across all slices, so one slice that regresses cannot hide behind the mean.

A slice is
- each lm-eval subtask of a group (from results.json's `group_subtasks`);
- for a task whose items carry it, the value of `evaluate.slice_field` in the item (lm-eval's `doc`);
- for the in-domain task, the seed field `evaluate.slice_field`, or else the seed file the row came from
  (written into the task's items as `slice` by the evaluate stage).
A task with a single slice adds nothing to its own paired test and is left out.
"""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

__all__ = ["holm", "mcnemar", "read_samples", "table"]


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b items right only for one side and c only for the other."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def read_samples(path: Path) -> dict[int, dict]:
    """doc_id -> its row of an lm-eval samples file (nothing when the file is missing)."""
    if not path.is_file():
        return {}
    with open(path) as f:
        return {s["doc_id"]: s for s in map(json.loads, f)}


def _items(path: Path, metric: str) -> dict[int, tuple[bool, dict]]:
    return {i: (bool(s[metric]), s.get("doc") or {}) for i, s in read_samples(path).items() if metric in s}


def _subtasks(results: dict, task: str) -> list[str]:
    groups = results.get("group_subtasks") or {}
    found, todo = [], list(groups.get(task, []))
    while todo:
        name = todo.pop(0)
        if name in groups and groups[name]:
            todo.extend(groups[name])
        else:
            found.append(name)
    return found


def table(tasks: list[str], tuned_dir: Path, ref_dir: Path, metric: str, slice_field: str | None) -> list[dict]:
    """One row per slice of `tasks` (tuned vs the reference, item by item): task, slice, items, both
    scores, delta, the items right only for either side, p and the Holm-adjusted p (across every row).
    Sorted by delta, the worst first."""
    results_file = tuned_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows = []
    for task in tasks:
        members = _subtasks(results, task)
        groups: dict[str, list[tuple[bool, bool]]] = {}
        for name in members or [task]:
            tuned = _items(tuned_dir / f"samples_{name}.jsonl", metric)
            ref = _items(ref_dir / f"samples_{name}.jsonl", metric)
            for i in sorted(set(tuned) & set(ref)):
                doc = tuned[i][1]
                label = name if members else doc.get("slice", doc.get(slice_field) if slice_field else None)
                if label is not None:
                    groups.setdefault(str(label), []).append((tuned[i][0], ref[i][0]))
        if len(groups) < 2:
            continue
        for label, pairs in groups.items():
            n = len(pairs)
            b = sum(t and not r for t, r in pairs)
            c = sum(r and not t for t, r in pairs)
            t_score, r_score = sum(t for t, _ in pairs) / n, sum(r for _, r in pairs) / n
            rows.append({"task": task, "slice": label, "items": n, "tuned": round(t_score, 4),
                         "reference": round(r_score, 4), "delta": round(t_score - r_score, 4),
                         "tuned_only": b, "reference_only": c, "p": mcnemar(b, c)})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adjusted
    return sorted(rows, key=lambda r: (r["delta"], r["task"], r["slice"]))


def regressions(rows: list[dict], level: float) -> list[dict]:
    """The slices significantly worse than the reference after the correction."""
    return [r for r in rows if r["p_holm"] < level and r["reference_only"] > r["tuned_only"]]
