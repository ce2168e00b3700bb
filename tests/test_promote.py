"""promote: the gate decides with guard tasks, `latest` moves only on a pass, flips are listed."""

from __future__ import annotations

import json

from synthtune.artifacts import ArtifactRef, ArtifactStore, produce
from synthtune.stages import promote
from synthtune.stages.promote import PromoteConfig, comparison, decide

BASE = {"demo_facts": {"acc": 0.25, "acc_stderr": 0.07}, "guard": {"acc": 0.60, "acc_stderr": 0.05}}
TUNED = {"demo_facts": {"acc": 0.75, "acc_stderr": 0.07}, "guard": {"acc": 0.55, "acc_stderr": 0.05}}


def test_target_rule():
    assert decide(PromoteConfig(), BASE, TUNED)[0] is True
    ok, reasons = decide(PromoteConfig(min_delta=0.6), BASE, TUNED)
    assert not ok and "needs >= +0.6000) FAILED" in reasons[0]
    ok, reasons = decide(PromoteConfig(metric="acc_norm"), BASE, TUNED)
    assert not ok and "missing" in reasons[0]


def test_guard_rule():
    ok, reasons = decide(PromoteConfig(guard_tasks=["guard"], max_guard_drop=0.02), BASE, TUNED)
    assert not ok and reasons[1].startswith("guard guard/acc: tuned 0.5500 vs base 0.6000 (-0.0500") and "FAILED" in reasons[1]
    assert decide(PromoteConfig(guard_tasks=["guard"], max_guard_drop=0.1), BASE, TUNED)[0] is True


def test_comparison_rows():
    assert comparison(BASE, TUNED)[0] == {"task": "demo_facts", "metric": "acc", "base": 0.25, "tuned": 0.75,
                                          "delta": 0.5, "base_stderr": 0.07, "tuned_stderr": 0.07}


def _samples(store, key, correct: list[int]):
    def write(st):
        with open(st.path / "samples_demo_facts.jsonl", "w") as f:
            for i, c in enumerate(correct):
                f.write(json.dumps({"doc_id": i, "doc": {"id": f"q{i}"}, "acc": float(c)}) + "\n")
    return produce(store, "evaluate", key, {}, {}, write)


def _refs(store):
    base, tuned = _samples(store, "b", [1, 0, 0, 1]), _samples(store, "t", [1, 1, 1, 0])
    base.summary["scores"], tuned.summary["scores"] = BASE, TUNED
    return {"base": base, "tuned": tuned, "train": ArtifactRef(stage="train", key="tr", uri=store.uri("train", "tr"))}


def test_failing_gate_leaves_latest_untouched_with_reasons(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    store.write_latest({"adapter": "previous"})
    strict = demo_cfg.model_copy(update={"promote": PromoteConfig(min_delta=0.9)})
    ref = promote.run(strict, store, _refs(store))
    assert ref.summary["promoted"] is False and "FAILED" in ref.summary["reasons"][0]
    assert store.read_latest() == {"adapter": "previous"}
    verdict = json.loads(open(f"{ref.uri}/verdict.json").read())
    assert verdict["promoted"] is False and verdict["reasons"] == ref.summary["reasons"]


def test_passing_gate_moves_latest_and_lists_flips(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    ref = promote.run(demo_cfg, store, _refs(store))
    assert ref.summary["promoted"] is True
    latest = store.read_latest()
    assert latest["adapter"].endswith("/train/tr/adapter") and latest["train_key"] == "tr"
    assert latest["flips"]["demo_facts"] == {"right_to_wrong": ["q3"], "wrong_to_right": ["q1", "q2"]}
    assert open(f"{ref.uri}/comparison.png", "rb").read(4) == b"\x89PNG"
