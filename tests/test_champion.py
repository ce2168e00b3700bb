"""Champion vs challenger over several nights, on a real (temporary) Prefect server: a candidate must
beat the adapter in service, re-scored under identical flags and cached while the eval set holds."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from synthtune.registry import Registry
from synthtune.store import ArtifactStore
from tests.support import DEMO
from tests.support.flows import task_states

pytestmark = pytest.mark.flows


def _night(cfg, epochs: float, **promote):
    """One nightly run with `epochs` of training: (final state, task states by name, promote summary)."""
    from flows.pipeline import pipeline

    night = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs}),
                                   "promote": cfg.promote.model_copy(update=promote)})
    state = pipeline(night, return_state=True)
    assert state.is_completed(), state
    refs = state.result()
    return state, task_states(state.state_details.flow_run_id, len(refs)), refs


def _acc(ref) -> float:
    return ref.summary["scores"]["demo_facts"]["acc"]


def test_three_nights_a_rollback_and_the_night_after(prefect_server, demo_cfg):
    registry = Registry(ArtifactStore(demo_cfg.artifact_root), "demo")

    state, states, refs = _night(demo_cfg, 20)  # night 1: the first champion, judged vs base only
    assert state.name == "Completed" and "evaluate[champion]" not in states
    assert refs["promote"].summary["reasons"][0] == "no champion yet: the gate is vs base only"
    night1 = refs["train"].key
    assert registry.champion()["train_key"] == night1 and _acc(refs["evaluate[tuned]"]) > _acc(refs["evaluate[base]"])
    champion_acc = _acc(refs["evaluate[tuned]"])

    # serving handoff: the champion's adapter loads with PEFT (what vLLM's --lora-modules reads) and generates
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthtune.models import resolve

    adapter = registry.adapter_uri(registry.champion())
    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve(demo_cfg.student)), adapter)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Vardon?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    # night 2: a weaker candidate that still beats base is not promoted, and says why with both scores
    state, states, refs = _night(demo_cfg, 10)
    night2, weaker = refs["train"].key, _acc(refs["evaluate[tuned]"])
    assert state.name == "NotPromoted" and _acc(refs["evaluate[base]"]) < weaker < champion_acc
    reasons = refs["promote"].summary["reasons"]
    assert reasons[0].startswith("target demo_facts/acc: tuned") and reasons[0].endswith("ok")  # beats base
    assert reasons[1] == (f"target demo_facts/acc: tuned {weaker:.4f} vs champion {night1} {champion_acc:.4f} "
                          f"({weaker - champion_acc:+.4f}; needs > +0.0050) FAILED: worse than the champion")
    assert states["evaluate[champion]"] == "Cached"  # the champion's evaluation under these flags is its own night's
    assert registry.champion()["train_key"] == night1

    # night 3: a better candidate is promoted
    state, states, refs = _night(demo_cfg, 60)
    night3 = refs["train"].key
    assert state.name == "Completed" and refs["promote"].summary["promoted"]
    assert states["evaluate[champion]"] == "Cached" and registry.champion()["train_key"] == night3

    result = CliRunner().invoke(app, ["rollback", str(DEMO), f"artifact_root={demo_cfg.artifact_root}"])
    assert result.exit_code == 0 and registry.champion()["train_key"] == night1, result.output

    # the night after: the gate compares against the restored champion (its evaluation still cached)
    state, states, refs = _night(demo_cfg, 60, min_delta_vs_champion=0.01)
    assert states["evaluate[champion]"] == "Cached" and states["train"] == "Cached"
    assert f"vs champion {night1} {champion_acc:.4f}" in refs["promote"].summary["reasons"][1]
    assert refs["promote"].summary["promoted"] and registry.champion()["train_key"] == night3
    events = [(e["event"], e["train_key"], e["promoted"]) for e in registry.history()]
    assert events == [("decision", night1, True), ("decision", night2, False), ("decision", night3, True),
                      ("rollback", night1, True), ("decision", night3, True)]
