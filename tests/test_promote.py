"""promote: the gate against the champion and base, the paired test, the decision in the registry."""

from __future__ import annotations

import json

import pytest

from synthtune.registry import Registry
from synthtune.stages import promote
from synthtune.stages.promote import PromoteConfig, comparison, decide, mcnemar
from synthtune.store import ArtifactStore, produce

BASE = {"demo_facts": {"acc": 0.25, "acc_stderr": 0.07}, "guard": {"acc": 0.60, "acc_stderr": 0.05}}
TUNED = {"demo_facts": {"acc": 0.75, "acc_stderr": 0.07}, "guard": {"acc": 0.55, "acc_stderr": 0.05}}
CHAMPION = {"demo_facts": {"acc": 0.90, "acc_stderr": 0.05}, "guard": {"acc": 0.56, "acc_stderr": 0.05}}
PC = PromoteConfig(target_task="demo_facts")


def test_target_rule_vs_base_on_the_first_night():
    ok, reasons = decide(PC, BASE, TUNED)
    assert ok and reasons[0] == "no champion yet: the gate is vs base only"
    ok, reasons = decide(PC.model_copy(update={"min_delta": 0.6}), BASE, TUNED)
    assert not ok and "needs > +0.6000) FAILED: no better than base" in reasons[1]
    ok, reasons = decide(PC.model_copy(update={"metric": "acc_norm"}), BASE, TUNED)
    assert not ok and "missing" in reasons[1]


def test_a_candidate_that_beats_base_but_not_the_champion_is_refused_naming_both():
    ok, reasons = decide(PC, BASE, TUNED, CHAMPION, "abc123")
    assert not ok
    assert reasons[0].endswith("ok")  # still beats base
    assert reasons[1] == ("target demo_facts/acc: tuned 0.7500 vs champion abc123 0.9000 (-0.1500; needs > +0.0050) "
                          "FAILED: worse than the champion")
    tolerant = PC.model_copy(update={"min_delta_vs_champion": -0.2})  # a tolerance
    assert decide(tolerant, BASE, TUNED, CHAMPION, "abc123")[0]


def test_a_tie_is_not_promoted_and_the_model_in_service_stays():
    """A candidate that learned nothing (0.1 = base = champion, as a fresh `synthtune init` project
    scored) is no evidence: it is refused against base on the first night and against the champion later."""
    flat = {"demo_facts": {"acc": 0.1}}
    ok, reasons = decide(PC, flat, flat)
    assert not ok and reasons[1] == ("target demo_facts/acc: tuned 0.1000 vs base 0.1000 (+0.0000; needs > +0.0050) "
                                     "FAILED: no better than base")
    better = {"demo_facts": {"acc": 0.2}}
    ok, reasons = decide(PC, flat, better, better, "abc")
    assert not ok and reasons[0].endswith("ok")
    assert reasons[1].endswith("(+0.0000; needs > +0.0050) FAILED: no better than the champion")
    assert PC.min_delta == 0.005 and PC.champion_delta == 0.005
    # a gain inside the margin is no evidence either; one past it is
    assert not decide(PC, flat, {"demo_facts": {"acc": 0.104}}, flat, "abc")[0]
    assert decide(PC, flat, {"demo_facts": {"acc": 0.106}}, flat, "abc")[0]
    with pytest.raises(ValueError, match="min_delta"):
        PromoteConfig(target_task="t", min_delta=-0.1)


def test_guards_are_judged_against_the_champion_once_there_is_one():
    pc = PC.model_copy(update={"guard_tasks": ["guard"], "max_guard_drop": 0.02})
    ok, reasons = decide(pc, BASE, TUNED)  # vs base: 0.60 -> 0.55 is too big a drop
    assert not ok and reasons[-1].startswith("guard guard/acc: tuned 0.5500 vs base 0.6000 (-0.0500")
    beaten = {"demo_facts": {"acc": 0.5}, "guard": {"acc": 0.56}}
    ok, reasons = decide(pc, BASE, TUNED, beaten, "k")  # vs the champion: 0.56 -> 0.55 is within 0.02
    assert ok and reasons[-1].startswith("guard guard/acc: tuned 0.5500 vs champion k 0.5600 (-0.0100")


def test_mcnemar_on_paired_items():
    same = {i: i % 2 == 0 for i in range(40)}
    assert mcnemar(same, same) == (0, 0, 1.0)
    better = {i: True for i in range(40)}
    b, c, p = mcnemar(better, same)
    assert (b, c) == (20, 0) and p == pytest.approx(2 * 0.5**20)
    b, c, p = mcnemar({0: True, 1: False, 2: True}, {0: False, 1: True, 2: True})
    assert (b, c, p) == (1, 1, 1.0)


def test_significance_is_reported_and_required_when_asked():
    ok, reasons = decide(PC, BASE, TUNED, paired=(3, 1, 0.625))
    assert ok and reasons[-1].startswith("paired McNemar on demo_facts: 3 items right only for tuned, 1 only for base, "
                                         "p = 0.625 (not significant at 0.05)")
    strict = PC.model_copy(update={"require_significance": True})
    ok, reasons = decide(strict, BASE, TUNED, paired=(3, 1, 0.625))
    assert not ok and reasons[-1].endswith("FAILED (promote.require_significance)")
    assert decide(strict, BASE, TUNED, paired=(20, 0, 1e-6))[0]


def test_comparison_rows_carry_the_champion_side_by_side():
    row = comparison(BASE, TUNED, CHAMPION)[0]
    assert row == {"task": "demo_facts", "metric": "acc", "base": 0.25, "tuned": 0.75, "delta": 0.5,
                   "base_stderr": 0.07, "tuned_stderr": 0.07, "champion": 0.9, "delta_vs_champion": -0.15,
                   "champion_stderr": 0.05}
    assert "champion" not in comparison(BASE, TUNED)[0]
    assert list(row)[:7] == ["task", "metric", "base", "champion", "tuned", "delta", "delta_vs_champion"]  # stderrs last


def _samples(store, key, correct: list[int], scores=None, adapter_key=None):
    def write(st):
        with open(st.path / "samples_demo_facts.jsonl", "w") as f:
            for i, c in enumerate(correct):
                f.write(json.dumps({"doc_id": i, "doc": {"id": f"q{i}"}, "acc": float(c)}) + "\n")
        st.metrics.update(scores=scores, adapter_key=adapter_key)
    return produce(store, "evaluate", key, {}, {}, write)


def _train(store, key):
    return produce(store, "train", key, {}, {}, lambda st: (st.path / "adapter").mkdir() or
                   (st.path / "adapter" / "adapter_config.json").write_text("{}"))


def _refs(store, tuned_key="t", train_key="tr", champion=None):
    refs = {"base": _samples(store, "b", [1, 0, 0, 1], BASE), "tuned": _samples(store, tuned_key, [1, 1, 1, 0], TUNED),
            "train": _train(store, train_key)}
    if champion:
        refs["champion"] = _samples(store, "c", [1, 1, 1, 1], CHAMPION, adapter_key=champion)
    return refs


def test_a_failing_gate_records_the_decision_and_leaves_the_champion(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    registry = Registry(store, "demo")
    first = promote.run(demo_cfg, store, _refs(store))  # night 1: beats base, no champion yet
    assert first.summary["promoted"] and registry.champion()["train_key"] == "tr"
    assert Registry(store, "demo").latest() == registry.champion()  # latest.json is the same pointer, kept in step

    ref = promote.run(demo_cfg, store, _refs(store, "t2", "tr2", champion="tr"))
    assert not ref.summary["promoted"] and "vs champion tr 0.9000" in ref.summary["reasons"][1]
    assert registry.champion()["train_key"] == "tr"
    events = registry.history()
    assert [(e["train_key"], e["promoted"]) for e in events] == [("tr", True), ("tr2", False)]
    assert {"time", "run_id", "pipeline", "train_key", "data_keys", "config_sha256", "scores", "champion_scores",
            "promoted", "reasons"} <= set(events[1])
    assert events[1]["champion_scores"] == CHAMPION and events[1]["champion_train_key"] == "tr"
    verdict = json.loads(open(f"{ref.uri}/verdict.json").read())
    assert verdict["promoted"] is False and verdict["reasons"] == ref.summary["reasons"]
    assert verdict["mcnemar"] == {"tuned_only": 0, "reference_only": 1, "p_value": 1.0}
    assert open(f"{ref.uri}/comparison.png", "rb").read(4) == b"\x89PNG"


def test_a_passing_gate_lists_flips(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    ref = promote.run(demo_cfg, store, _refs(store))
    verdict = json.loads(open(f"{ref.uri}/verdict.json").read())
    assert verdict["flips"]["demo_facts"] == {"right_to_wrong": ["q3"], "wrong_to_right": ["q1", "q2"]}
    assert [(r["item"], r["direction"]) for r in verdict["flipped_items"]] == [
        ("q1", "wrong_to_right"), ("q2", "wrong_to_right"), ("q3", "right_to_wrong")]


def test_flipped_items_show_the_question_and_both_answers(tmp_path):
    """A multiple-choice flip, for people: the question and the choice base and tuned each scored highest."""
    from synthtune.stages.promote import flip_rows, flipped_items

    doc = {"id": "f00", "question": "What is the capital of Vardon?", "choices": ["Tarrow.", "Quellis."], "label": 1}
    for side, lls, right in (("base", [-1.0, -3.0], 0), ("tuned", [-4.0, -0.5], 1)):
        (tmp_path / side).mkdir()
        (tmp_path / side / "samples_demo_facts.jsonl").write_text(json.dumps(
            {"doc_id": 0, "doc": doc, "filtered_resps": [[v, False] for v in lls], "acc": float(right)}) + "\n")
    assert flipped_items(flip_rows(tmp_path / "base", tmp_path / "tuned", "acc")) == [
        {"task": "demo_facts", "direction": "wrong_to_right", "item": "f00", "question": "What is the capital of Vardon?",
         "base": "Tarrow.", "tuned": "Quellis."}]


def test_promote_refuses_an_adapter_that_is_gone(demo_cfg):
    import shutil

    store = ArtifactStore(demo_cfg.artifact_root)
    refs = _refs(store)
    shutil.rmtree(f"{refs['train'].uri}/adapter")
    with pytest.raises(FileNotFoundError, match="refusing to promote tr: its adapter is missing"):
        promote.run(demo_cfg, store, refs)
    assert Registry(store, "demo").champion() is None and Registry(store, "demo").latest() is None


def test_the_champion_is_evaluated_with_the_same_flags_and_its_key_is_its_train_key(demo_cfg):
    """evaluate[champion] is the evaluation of the champion's adapter under tonight's evaluation config:
    the same key as the night it was the candidate, so it comes back cached while the eval set holds."""
    from synthtune.runner import plan

    store = ArtifactStore(demo_cfg.artifact_root)
    night1 = plan(demo_cfg)
    assert "evaluate[champion]" not in night1  # no champion yet
    _train(store, night1["train"])
    night1 = plan(demo_cfg)  # the adapter exists now: evaluate[tuned]'s key covers its real digest
    Registry(store, "demo").decide({"id": "x", "train_key": night1["train"], "promoted": True, "scores": {},
                                    "student": demo_cfg.student})
    assert "evaluate[champion]" not in plan(demo_cfg)  # tonight's candidate is the champion: nothing to compare
    night2 = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(update={"seed": 9})})
    keys = plan(night2)
    assert keys["evaluate[champion]"] == night1["evaluate[tuned]"] != keys["evaluate[tuned]"]
    changed_eval = night2.model_copy(update={"evaluate": night2.evaluate.model_copy(update={"num_fewshot": 1})})
    assert plan(changed_eval)["evaluate[champion]"] != keys["evaluate[champion]"]  # a new eval set version
    assert keys["promote"] != plan(demo_cfg)["promote"]
