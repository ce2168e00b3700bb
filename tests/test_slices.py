"""Per-slice gate: a paired test per slice (group subtasks, item fields, the in-domain seed slices),
Holm–Bonferroni across slices, and a significant regression on one slice rejects the candidate."""

from __future__ import annotations

import json

import pytest

from synthtune import slices
from synthtune.registry import Registry
from synthtune.stages import promote
from synthtune.stages.promote import PromoteConfig, decide
from synthtune.store import ArtifactStore, produce

TOPICS = ["capitals", "rivers", "rulers", "coins", "festivals"]


def _write(folder, name: str, right: list[bool], topics: list[str], results: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"samples_{name}.jsonl", "w") as f:
        for i, (r, t) in enumerate(zip(right, topics, strict=True)):
            f.write(json.dumps({"doc_id": i, "doc": {"id": f"q{i}", "topic": t}, "acc": float(r)}) + "\n")
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))


def _five_slices():
    """40 items per topic. The reference gets half of each right. On four topics the candidate gets 10
    more right and 2 fewer (raw p 0.039 each: not significant once corrected for five slices); on `coins`
    it loses 15 of its 20. The mean rises (100 -> 117 of 200) while one slice collapses."""
    ref, tuned, topics = [], [], []
    for topic in TOPICS:
        base = [i % 2 == 0 for i in range(40)]
        if topic == "coins":
            cand = [r and i >= 30 for i, r in enumerate(base)]  # 15 of the 20 right ones lost
        else:
            cand = [(r or i < 20) and i not in (36, 38) for i, r in enumerate(base)]  # 10 gained, 2 lost
        ref += base
        tuned += cand
        topics += [topic] * 40
    return ref, tuned, topics


def test_holm_adjusts_in_input_order():
    assert slices.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert slices.holm([]) == []


def test_a_regression_on_one_slice_of_five_is_caught_after_correction_while_the_mean_improves(tmp_path):
    ref, tuned, topics = _five_slices()
    _write(tmp_path / "ref", "demo_facts", ref, topics)
    _write(tmp_path / "tuned", "demo_facts", tuned, topics)
    assert sum(tuned) > sum(ref)  # the mean improves
    rows = slices.table(["demo_facts"], tmp_path / "tuned", tmp_path / "ref", "acc", "topic")
    assert rows[0]["slice"] == "coins"  # sorted by delta, the worst first
    coins, rest = rows[0], rows[1:]
    assert (coins["tuned_only"], coins["reference_only"], coins["items"]) == (0, 15, 40)
    assert coins["p_holm"] < 0.05
    assert all(r["p"] < 0.05 <= r["p_holm"] for r in rest)  # significant alone, not after the correction
    pc = PromoteConfig(target_task="demo_facts")
    base, cand = {"demo_facts": {"acc": 0.3}}, {"demo_facts": {"acc": sum(tuned) / len(tuned)}}
    ok, reasons = decide(pc, base, cand, sliced=rows)
    failed = [r for r in reasons if "FAILED" in r]
    assert not ok and len(failed) == 1
    assert failed[0].startswith("slice demo_facts/coins: tuned 0.1250 vs base 0.5000 (-0.3750; 15 items right only "
                                "for base, 0 only for tuned; p = 6.1e-05, 0.000305 after Holm over 5 slices)")
    # the same candidate without the collapsed slice passes, and the gate says what it checked
    fine = [r for r in rows if r["slice"] != "coins"]
    ok, reasons = decide(pc, base, cand, sliced=fine)
    assert ok and reasons[-1].startswith("slices: 4 slices of demo_facts, no significant regression vs base after Holm")


def test_group_subtasks_are_slices_and_a_single_slice_adds_nothing(tmp_path):
    results = {"group_subtasks": {"facts": ["facts_a", "facts_b"]}}
    for side, a, b in (("ref", [True] * 20, [True] * 20), ("tuned", [True] * 20, [False] * 20)):
        _write(tmp_path / side, "facts_a", a, ["x"] * 20, results)
        _write(tmp_path / side, "facts_b", b, ["x"] * 20, results)
    rows = slices.table(["facts"], tmp_path / "tuned", tmp_path / "ref", "acc", None)
    assert [(r["slice"], r["delta"]) for r in rows] == [("facts_b", -1.0), ("facts_a", 0.0)]
    assert slices.regressions(rows, 0.05)[0]["slice"] == "facts_b"
    # one topic only: the task's own paired test covers it
    assert slices.table(["facts_a"], tmp_path / "tuned", tmp_path / "ref", "acc", "topic") == []


def _decided(demo_cfg):
    """promote.run on the five-slice evaluations (sliced by `topic`, with a forgetting loss of 2.0 for
    base and 2.1 for tuned): (config, store, the promote output)."""
    cfg = demo_cfg.model_copy(update={"evaluate": demo_cfg.evaluate.model_copy(update={"slice_field": "topic"})})
    store = ArtifactStore(cfg.artifact_root)
    ref, tuned, topics = _five_slices()

    def evaluation(key, right, acc, loss):
        def write(st):
            _write(st.path, "demo_facts", right, topics)
            st.metrics.update(scores={"demo_facts": {"acc": acc}, "forgetting": {"loss": loss}})
        return produce(store, "evaluate", key, {}, {}, write)

    train = produce(store, "train", "tr", {}, {}, lambda st: (st.path / "adapter").mkdir() or
                    (st.path / "adapter" / "adapter_config.json").write_text("{}"))
    refs = {"base": evaluation("b", ref, 0.5, 2.0), "tuned": evaluation("t", tuned, sum(tuned) / len(tuned), 2.1),
            "train": train}
    return cfg, store, promote.run(cfg, store, refs)


def test_the_verdict_shows_the_slice_table_and_the_gate_refuses(demo_cfg, monkeypatch):
    cfg, store, out = _decided(demo_cfg)
    assert not out.summary["promoted"] and Registry(store, "demo").champion() is None
    verdict = json.loads(open(f"{out.uri}/verdict.json").read())
    assert [r["slice"] for r in verdict["slices"]] == ["coins", "capitals", "festivals", "rivers", "rulers"]
    assert any(r.startswith("slice demo_facts/coins") and r.endswith("FAILED: significant regression")
               for r in verdict["reasons"])
    assert out.summary["slices"][0]["slice"] == "coins"
    assert verdict["forgetting"] == {"base": 2.0, "champion": None, "tuned": 2.1, "rise": 0.05}
    assert any(r.startswith("forgetting: general-text loss tuned 2.1000 vs base 2.0000 (+5.0%") for r in verdict["reasons"])
    # synthtune models shows both figures beside the decision
    from typer.testing import CliRunner

    from synthtune.cli import app
    from synthtune.cli.common import console
    from tests.conftest import DEMO

    monkeypatch.setattr(console, "width", 300)  # a wide terminal: one line per decision
    listed = CliRunner().invoke(app, ["models", str(DEMO), f"artifact_root={cfg.artifact_root}"])
    assert listed.exit_code == 0, listed.output
    assert "forgetting" in listed.output and "worst" in listed.output
    assert "+5.0% (2.100)" in listed.output and "demo_facts/coins -0.375 (p 0.00031)" in listed.output


@pytest.mark.flows
def test_the_verdict_artifacts_show_the_slices_worst_first_and_the_forgetting_loss(demo_cfg, prefect_server):
    """What the Prefect UI shows for a decision: the eval-slices table and the verdict with the loss."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from tasks.promote import report

    _, store, out = _decided(demo_cfg)
    report(store, out)
    with get_client(sync_client=True) as client:
        def latest(key):  # other tests on the shared server write the same keys: the newest is this one
            return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)[0].data

        table, verdict = latest("eval-slices"), latest("promotion-verdict")
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["slice"] for r in rows][0] == "coins" and rows[0]["p_holm"] < 0.05
    assert "slice demo_facts/coins" in verdict and "FAILED: significant regression" in verdict
    assert "General-text loss (forgetting): base 2.0000, champion None, tuned 2.1000 (+5.0% over base)" in verdict
