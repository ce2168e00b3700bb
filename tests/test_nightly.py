"""Nightly runs pay only for what is new: night 2 adds a seed file with 10% more seeds, and the
teacher (a real OpenAI-compatible server, `transformers serve`, behind a counting hop) receives
exactly the new seeds' requests; a crash mid-night is retried for only the seeds with no answer yet."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from synthtune.runner import plan, run_all
from synthtune.stages import generate
from synthtune.store import ArtifactStore
from synthtune.tiny import demo_facts
from tests.support.servers import FaultyHop

pytestmark = pytest.mark.integration
N = 20  # night 1's seeds; night 2 adds N // 10


def _night(folder: Path, name: str, facts: list[dict], extra_lines: bytes = b"") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"id": f["id"], "prompt": f["question"]}) + "\n" for f in facts).encode()
    (folder / name).write_bytes(text + extra_lines)


def _cfg(demo_cfg, seeds: Path, **gen):
    update = {"seeds": str(seeds), "batch_size": 4, **gen}
    return demo_cfg.model_copy(update={"generate": demo_cfg.generate.model_copy(update=update),
                                       "train": demo_cfg.train.model_copy(update={"epochs": 6.0})})


def test_night_two_asks_the_teacher_only_for_the_new_seeds(demo_cfg, tmp_path, served_teacher):
    base, model = served_teacher
    seeds = tmp_path / "seeds"
    _night(seeds, "2026-12-01.jsonl", demo_facts()[:N])
    hop = FaultyHop(base, [])
    try:
        night1 = _cfg(demo_cfg, seeds, teacher_kind="openai", teacher=model, base_url=hop.url)
        first = run_all(night1)
        assert hop.posts == N and first["generate"].summary["rows"]["generated"] == N

        # night 2: a new file with 10% more seeds, plus a malformed line and a line that is not UTF-8
        bad = b'{"id": "broken", "prompt": \n{"id": "latin", "prompt": "caf\xe9?"}\n'
        _night(seeds, "2026-12-02.jsonl", demo_facts()[N:N + N // 10], bad)
        hop.posts = 0
        night2 = _cfg(demo_cfg, seeds, teacher_kind="openai", teacher=model, base_url=hop.url)
        second = run_all(night2)
    finally:
        hop.close()
    assert hop.posts == N // 10  # exactly the new seeds' requests
    rows = second["generate"].summary["rows"]
    assert (rows["output"], rows["reused"], rows["generated"], rows["new"]) == (N + N // 10, N, N // 10, N // 10)
    data = pd.read_parquet(f"{second['generate'].uri}/data.parquet")
    assert list(data["id"]) == [f["id"] for f in demo_facts()[:N + N // 10]]  # reused plus new, in seed order
    assert list(data["seed_file"].unique()) == ["2026-12-01.jsonl", "2026-12-02.jsonl"]
    quarantined = pd.read_parquet(f"{second['generate'].uri}/quarantine.parquet")
    assert {(q.file, q.line, q.reason.split(" (")[0]) for q in quarantined.itertuples()} == {
        ("2026-12-02.jsonl", str(N // 10 + 1), "not JSON: Expecting value"),
        ("2026-12-02.jsonl", str(N // 10 + 2), "not UTF-8")}

    changed = {step for step, key in plan(night2).items() if key != first[step].key}
    assert changed == {"generate", "filter", "template", "train", "evaluate[tuned]", "promote"}
    assert {s: r.key for s, r in second.items()} == plan(night2)  # each of them ran and committed
    assert second["evaluate[base]"].key == first["evaluate[base]"].key  # the base scores are reused


def test_the_local_teacher_reuses_every_answer_it_holds(demo_cfg, tmp_path, monkeypatch):
    seeds = tmp_path / "seeds"
    _night(seeds, "night1.jsonl", demo_facts()[:N])
    store = ArtifactStore(demo_cfg.artifact_root)
    first = generate.run(_cfg(demo_cfg, seeds), store)
    assert (first.summary["rows"]["reused"], first.summary["rows"]["generated"]) == (0, N)
    _night(seeds, "night2.jsonl", demo_facts()[N:N + N // 10])
    second = generate.run(_cfg(demo_cfg, seeds), store)
    assert (second.summary["rows"]["reused"], second.summary["rows"]["generated"]) == (N, N // 10)
    assert second.summary["rows"]["output"] == N + N // 10

    # an edited seed is asked again; a removed one drops out
    edited = [dict(f, question=f["question"].replace("?", ", exactly?")) if i == 0 else f
              for i, f in enumerate(demo_facts()[:N])]
    _night(seeds, "night1.jsonl", edited[:-1])
    third = generate.run(_cfg(demo_cfg, seeds), store)
    data = pd.read_parquet(f"{third.uri}/data.parquet")
    assert (third.summary["rows"]["reused"], third.summary["rows"]["generated"]) == (N - 2 + N // 10, 1)
    assert demo_facts()[N - 1]["id"] not in set(data["id"]) and data["prompt"].iloc[0].endswith(", exactly?")

    # a night whose answers are all in the row cache asks nothing and starts no process
    import synthtune.child

    started: list = []
    spawn = synthtune.child.call_in_child
    monkeypatch.setattr(synthtune.child, "call_in_child", lambda *a, **k: started.append(a) or spawn(*a, **k))
    _night(seeds, "night1.jsonl", edited[:-2])  # one seed fewer: another key, every answer held
    fourth = generate.run(_cfg(demo_cfg, seeds), store)
    assert fourth.key != third.key and not fourth.reused and fourth.summary["rows"]["generated"] == 0
    assert not started, "a process was started for a night with nothing to ask"


def test_a_crash_mid_night_is_retried_for_only_the_unanswered_seeds(demo_cfg, tmp_path, served_teacher):
    base, model = served_teacher
    seeds = tmp_path / "seeds"
    _night(seeds, "night1.jsonl", demo_facts()[:8])
    hop = FaultyHop(base, [])
    store = ArtifactStore(demo_cfg.artifact_root)
    try:
        cfg = _cfg(demo_cfg, seeds, teacher_kind="openai", teacher=model, base_url=hop.url, batch_size=2)
        generate.run(cfg, store)
        _night(seeds, "night2.jsonl", demo_facts()[8:12])  # 4 new seeds: 2 batches
        hop.faults[:] = [None, None] + [400] * 10  # the first new batch goes through, then the teacher fails
        hop.posts = 0
        with pytest.raises(Exception, match=r"the teacher gave up on 2 of 4 requests"):
            generate.run(cfg, store)
        assert hop.posts == 2
        hop.faults.clear()
        hop.posts = 0
        ref = generate.run(cfg, store)  # the retry
    finally:
        hop.close()
    assert hop.posts == 2  # only the seeds that had no answer yet
    assert (ref.summary["rows"]["reused"], ref.summary["rows"]["generated"]) == (10, 2)
    assert list(pd.read_parquet(f"{ref.uri}/data.parquet")["id"]) == [f["id"] for f in demo_facts()[:12]]
