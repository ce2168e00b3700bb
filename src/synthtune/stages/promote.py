"""promote: move the `latest` pointer to the tuned adapter when it is not worse than base.

Compares the tuned and base scores of `promote.target_task` / `promote.metric`. Passing writes
`{artifact_root}/latest.json`; failing leaves it untouched and records the reasons.

Run as: synthtune promote configs/demo.yaml
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import Section, field

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "promote"
VERSION = "1"
UPSTREAM = ("base", "tuned", "train")


class PromoteConfig(Section):
    target_task: str = field("demo_facts", "Task whose score decides promotion; must be one of evaluate.tasks.")
    metric: str = field("acc", "Metric of the target task that is compared, e.g. acc or acc_norm.")
    min_delta: float = field(0.0, "Tuned minus base must be at least this for the adapter to be promoted.")


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    return stage_key(STAGE, VERSION, {"promote": key_payload(cfg.promote)}, upstream)


def comparison(base: dict, tuned: dict) -> list[dict]:
    """One row per task and metric: base, tuned, delta (stderr metrics folded into their row)."""
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
    b = base.get(pc.target_task, {}).get(pc.metric)
    t = tuned.get(pc.target_task, {}).get(pc.metric)
    if b is None or t is None:
        return False, [f"metric '{pc.metric}' missing for task '{pc.target_task}' (base={b}, tuned={t})"]
    if t - b < pc.min_delta:
        return False, [f"{pc.target_task}/{pc.metric}: tuned {t:.4f} - base {b:.4f} = {t - b:+.4f} "
                       f"< promote.min_delta {pc.min_delta:+.4f}"]
    return True, [f"{pc.target_task}/{pc.metric}: tuned {t:.4f} vs base {b:.4f} ({t - b:+.4f})"]


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    base, tuned, train = upstream["base"], upstream["tuned"], upstream["train"]

    def build(staging: Staging) -> None:
        b, t = base.summary["scores"], tuned.summary["scores"]
        promoted, reasons = decide(cfg.promote, b, t)
        verdict = {"promoted": promoted, "reasons": reasons, "comparison": comparison(b, t),
                   "adapter": store.uri(train.stage, train.key, "adapter"), "train_key": train.key}
        if promoted:
            store.write_latest({**verdict, "pipeline": cfg.name, "student": cfg.student,
                                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        (staging.path / "verdict.json").write_text(json.dumps(verdict, indent=2))
        staging.metrics.update(promoted=promoted, reasons=reasons, comparison=verdict["comparison"])

    ups = {"base": base.key, "tuned": tuned.key, "train": train.key}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(cfg.promote), build)
