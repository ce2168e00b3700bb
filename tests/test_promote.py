"""promote: the gate decides, `latest` moves only on a pass."""

from __future__ import annotations

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.stages import promote
from synthtune.stages.promote import PromoteConfig, comparison, decide

BASE = {"demo_facts": {"acc": 0.25, "acc_stderr": 0.07}}
TUNED = {"demo_facts": {"acc": 0.75, "acc_stderr": 0.07}}


def test_decide():
    assert decide(PromoteConfig(), BASE, TUNED)[0] is True
    ok, reasons = decide(PromoteConfig(min_delta=0.6), BASE, TUNED)
    assert not ok and "< promote.min_delta +0.6000" in reasons[0]
    ok, reasons = decide(PromoteConfig(metric="acc_norm"), BASE, TUNED)
    assert not ok and "missing" in reasons[0]


def test_comparison_rows():
    assert comparison(BASE, TUNED) == [{"task": "demo_facts", "metric": "acc", "base": 0.25, "tuned": 0.75,
                                        "delta": 0.5, "base_stderr": 0.07, "tuned_stderr": 0.07}]


def _refs(store):
    def ref(stage, key, scores=None):
        return ArtifactRef(stage=stage, key=key, uri=store.uri(stage, key), summary={"scores": scores or {}})
    return {"base": ref("evaluate", "b", BASE), "tuned": ref("evaluate", "t", TUNED), "train": ref("train", "tr")}


def test_failing_gate_leaves_latest_untouched(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    store.write_latest({"adapter": "previous"})
    strict = demo_cfg.model_copy(update={"promote": PromoteConfig(min_delta=0.9)})
    ref = promote.run(strict, store, _refs(store))
    assert ref.summary["promoted"] is False and "min_delta" in ref.summary["reasons"][0]
    assert store.read_latest() == {"adapter": "previous"}


def test_passing_gate_moves_latest(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    ref = promote.run(demo_cfg, store, _refs(store))
    assert ref.summary["promoted"] is True
    latest = store.read_latest()
    assert latest["adapter"].endswith("/train/tr/adapter") and latest["train_key"] == "tr"
