"""Forgetting: a general-text sample scored as mean token loss by base and candidate; the gate rejects
a candidate whose loss rose more than promote.max_forgetting."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from synthtune.config import load_config
from synthtune.eval_tasks import paragraphs
from synthtune.stages import evaluate, template, train
from synthtune.stages.promote import PromoteConfig, decide
from synthtune.store import ArtifactStore, produce
from synthtune.tiny import demo_facts
from tests.conftest import DEMO

PC = PromoteConfig(target_task="demo_facts")


def test_the_gate_rejects_a_candidate_that_forgot_too_much_and_reports_it_otherwise():
    base = {"demo_facts": {"acc": 0.2}, "forgetting": {"loss": 2.0}}
    tuned = {"demo_facts": {"acc": 0.5}, "forgetting": {"loss": 2.3}}
    ok, reasons = decide(PC, base, tuned)
    assert not ok and reasons[-1] == ("forgetting: general-text loss tuned 2.3000 vs base 2.0000 (+15.0%; may rise at "
                                      "most 10.0%) FAILED: forgot too much")
    ok, reasons = decide(PC, base, {**tuned, "forgetting": {"loss": 2.1}}, {**base, "forgetting": {"loss": 2.05}}, "k")
    assert ok and reasons[-1].endswith("(+5.0%; champion 2.0500; may rise at most 10.0%) ok")
    ok, reasons = decide(PC.model_copy(update={"max_forgetting": None}), base, tuned)
    assert ok and reasons[-1].endswith("(+15.0%; not gated)")
    assert all("forgetting" not in r for r in decide(PC, {"demo_facts": {"acc": 0.2}}, {"demo_facts": {"acc": 0.5}})[1])


def test_the_shipped_sample_is_general_text():
    from importlib import resources

    texts = paragraphs(resources.files("synthtune.data").joinpath("general_text.txt"))
    assert len(texts) >= 15 and all(len(t) > 150 for t in texts) and not any(t.startswith("#") for t in texts)


@pytest.mark.integration
def test_a_candidate_trained_to_forget_is_rejected_on_forgetting(tmp_path):
    """The base is the tiny teacher (it knows the demo facts); the sample is those facts as plain text. A
    candidate trained hard on noise for answers (strings of rare letters) forgets them: its loss on the
    sample rises far past base's, and the gate says so."""
    facts = demo_facts()
    sample = tmp_path / "what_base_knows.txt"
    sample.write_text("\n\n".join(" ".join(f["answer"] for f in facts[i:i + 4]) for i in range(0, len(facts), 4)))
    cfg = load_config(DEMO, [f"artifact_root={tmp_path / 'artifacts'}", "student=tiny:teacher",
                             f"evaluate.forgetting={sample}", "train.learning_rate=0.02", "train.epochs=10",
                             "train.quantization=none"])
    rng = random.Random(0)
    noise = "qxzjvkwy"
    rows = [{"id": f["id"], "prompt": f["question"],
             "response": " ".join("".join(rng.choice(noise) for _ in range(rng.randint(3, 9))) for _ in range(12))}
            for f in facts]
    store = ArtifactStore(cfg.artifact_root)
    garbled = produce(store, "filter", "garbled", {}, {}, lambda st: pd.DataFrame(rows).to_parquet(st.path / "data.parquet"))
    adapter = train.run(cfg, store, {"template": template.run(cfg, store, {"filter": garbled})})
    base = evaluate.run(cfg, store).summary["scores"]
    tuned = evaluate.run(cfg, store, {"train": adapter}).summary["scores"]
    assert 0 < base["forgetting"]["loss"] < tuned["forgetting"]["loss"]
    assert {"word_perplexity", "bits_per_byte"} <= set(base["forgetting"])
    ok, reasons = decide(cfg.promote, base, tuned)
    line = next(r for r in reasons if r.startswith("forgetting:"))
    assert not ok and line.endswith("FAILED: forgot too much"), reasons
