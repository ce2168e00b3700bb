"""promote: compare tuned with base, and move the `latest` pointer only when the gate passes.

The gate: the target task's metric must improve by at least `min_delta`, and no guard task's
metric may drop by more than `max_guard_drop`. Passing writes `{artifact_root}/latest.json`;
failing leaves it untouched and records the reasons. Either way the comparison table (base, tuned,
delta, stderr per task and metric), a bar chart and the items that flipped right->wrong and
wrong->right are written next to the verdict.

Run as: synthtune promote configs/demo.yaml
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import Section, field

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "promote"
VERSION = "2"


class PromoteConfig(Section):
    target_task: str = field("demo_facts", "Task whose score decides promotion; must be one of evaluate.tasks.")
    metric: str = field("acc", "Metric compared for every task, e.g. acc, acc_norm, exact_match[strict-match].")
    min_delta: float = field(0.0, "Tuned minus base on the target task must be at least this to promote.")
    guard_tasks: list[str] = field([], "Tasks that must not get worse: each may drop by at most max_guard_drop.")
    max_guard_drop: float = field(0.02, "Largest drop (base minus tuned) allowed on any guard task.", ge=0)


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    return stage_key(STAGE, VERSION, {"promote": key_payload(cfg.promote)}, upstream)


def comparison(base: dict, tuned: dict) -> list[dict]:
    """One row per task and metric: base, tuned, delta, and both stderrs."""
    rows = []
    for task in sorted(set(base) | set(tuned)):
        for metric in sorted(set(base.get(task, {})) | set(tuned.get(task, {}))):
            if metric.endswith("_stderr"):
                continue
            b, t = base.get(task, {}).get(metric), tuned.get(task, {}).get(metric)
            rows.append({"task": task, "metric": metric, "base": b, "tuned": t,
                         "delta": None if b is None or t is None else t - b,
                         "base_stderr": base.get(task, {}).get(f"{metric}_stderr"),
                         "tuned_stderr": tuned.get(task, {}).get(f"{metric}_stderr")})
    return rows


def decide(pc: PromoteConfig, base: dict, tuned: dict) -> tuple[bool, list[str]]:
    """(promote?, one line per rule with the numbers)."""
    lines, ok = [], True
    for task, role in [(pc.target_task, "target"), *[(g, "guard") for g in pc.guard_tasks]]:
        b, t = base.get(task, {}).get(pc.metric), tuned.get(task, {}).get(pc.metric)
        if b is None or t is None:
            ok = False
            lines.append(f"{role} {task}/{pc.metric}: missing (base={b}, tuned={t})")
            continue
        passed = (t - b >= pc.min_delta) if role == "target" else (b - t <= pc.max_guard_drop)
        rule = f"needs >= {pc.min_delta:+.4f}" if role == "target" else f"may drop at most {pc.max_guard_drop:.4f}"
        lines.append(f"{role} {task}/{pc.metric}: tuned {t:.4f} vs base {b:.4f} ({t - b:+.4f}; {rule}) "
                     f"{'ok' if passed else 'FAILED'}")
        ok = ok and passed
    return ok, lines


def _correct(path: Path, metric: str) -> dict[int, tuple[bool, str]]:
    """doc_id -> (scored right?, a short label) from an lm-eval samples file."""
    out = {}
    with open(path) as f:
        for line in f:
            s = json.loads(line)
            if metric in s:
                doc = s.get("doc", {})
                label = str(doc.get("id") or doc.get("question") or s["doc_id"])[:120]
                out[s["doc_id"]] = (bool(s[metric]), label)
    return out


def flips(base_dir: Path, tuned_dir: Path, metric: str) -> dict[str, dict[str, list[str]]]:
    """Per task, the items that went right->wrong and wrong->right between base and tuned."""
    out = {}
    for path in sorted(base_dir.glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_")
        other = tuned_dir / path.name
        if not other.exists():
            continue
        b, t = _correct(path, metric), _correct(other, metric)
        common = sorted(set(b) & set(t))
        out[task] = {"right_to_wrong": [b[i][1] for i in common if b[i][0] and not t[i][0]],
                     "wrong_to_right": [b[i][1] for i in common if not b[i][0] and t[i][0]]}
    return out


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["base"] is not None and r["tuned"] is not None]
    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows) + 1), 3.4))
    for offset, side, color in ((-0.2, "base", "#8c8c8c"), (0.2, "tuned", "#4c72b0")):
        ax.bar(x + offset, [r[side] for r in rows], 0.4, label=side, color=color,
               yerr=[r[f"{side}_stderr"] or 0 for r in rows], capsize=3)
    ax.set_xticks(x, labels)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    base, tuned, train = upstream["base"], upstream["tuned"], upstream["train"]

    def build(staging: Staging) -> None:
        b, t = base.summary["scores"], tuned.summary["scores"]
        promoted, reasons = decide(cfg.promote, b, t)
        rows = comparison(b, t)
        with store.local_copy(base) as base_dir, store.local_copy(tuned) as tuned_dir:
            flipped = flips(base_dir, tuned_dir, cfg.promote.metric)
        chart(rows, staging.path / "comparison.png", f"{cfg.name}: base vs tuned")
        verdict = {"promoted": promoted, "reasons": reasons, "comparison": rows, "flips": flipped,
                   "adapter": store.uri(train.stage, train.key, "adapter"), "train_key": train.key,
                   "base_eval": base.key, "tuned_eval": tuned.key}
        if promoted:
            store.write_latest({**verdict, "pipeline": cfg.name, "student": cfg.student,
                                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        (staging.path / "verdict.json").write_text(json.dumps(verdict, indent=2))
        staging.metrics.update(promoted=promoted, reasons=reasons, comparison=rows,
                               flips={task: {k: len(v) for k, v in f.items()} for task, f in flipped.items()})

    ups = {"base": base.key, "tuned": tuned.key, "train": train.key}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(cfg.promote), build)
