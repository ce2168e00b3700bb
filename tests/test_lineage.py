"""Nightly training that does not grow with history (train.init: champion, train.data: new): a night
continues the adapter in service on the rows its chain never trained on plus a replay sample; the
LoRA shape must match; a rollback moves where the next night starts; rebase_every bounds the chain;
a retry reads the same rows; DPO's reference is the starting policy."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from synthtune import lineage
from synthtune.config import load_config
from synthtune.registry import Registry
from synthtune.runner import plan, run_all
from synthtune.stages import train
from synthtune.store import ArtifactStore
from tests.support import DEMO, demo_preference_pairs
from tests.support.faults import CRASH_AT_START, inject

EDITED = ("f03", "f09", "f17", "f28")  # seeds whose prompt night 2 rewrites
CONTINUED = ["train.init=champion", "train.data=new", "train.replay=0.5", "train.continue_epochs=20",
             "promote.min_delta_vs_champion=-1.0"]  # the tests need it in service whatever it scores


def _seeds(folder, edited=EDITED):
    """The demo's seeds with some prompts edited (same id, new text: new rows to train on)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (DEMO.parent / "data" / "seeds" / "demo.jsonl").read_text().splitlines()]
    (folder / "seeds.jsonl").write_text("".join(json.dumps(
        {**r, "prompt": f"{r['prompt']} Answer in one sentence." if r["id"] in edited else r["prompt"]}) + "\n"
        for r in rows))
    return folder


@pytest.fixture(scope="module")
def night2(demo_run, tmp_path_factory):
    """Night 1 is the demo (trained from base on all 32 rows, in service); night 2 edits four seeds and
    continues it: (night-2 config, night 1's train key, night 2's outputs)."""
    cfg1, refs1 = demo_run
    base = tmp_path_factory.mktemp("lineage")
    shutil.copytree(cfg1.artifact_root, base / "artifacts", ignore=shutil.ignore_patterns(".prefect-results", ".locks"))
    seeds = _seeds(base / "seeds")
    cfg = load_config(DEMO, [f"artifact_root={base / 'artifacts'}", f"generate.seeds={seeds}", *CONTINUED])
    assert Registry(ArtifactStore(cfg.artifact_root), "demo").champion()["train_key"] == refs1["train"].key
    return cfg, refs1["train"].key, run_all(cfg)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/adapter_model.safetensors")


def test_with_no_champion_a_continued_night_starts_from_base_and_says_so(demo_cfg):
    cfg = load_config(DEMO, [f"artifact_root={demo_cfg.artifact_root}", *CONTINUED])
    start = lineage.start(cfg, ArtifactStore(cfg.artifact_root))
    assert start.parent is None and start.why == "from base: no champion yet to continue"
    with pytest.raises(ValueError, match="train.data: new .* needs train.init: champion"):
        load_config(DEMO, ["train.data=new"])


def test_replay_is_seeded_by_the_key_covers_all_history_and_an_edited_row_is_new():
    rows = pd.DataFrame({"id": [f"s{i}" for i in range(40)], "input_ids": [[i, i + 1] for i in range(40)],
                         "assistant_masks": [[0, 1]] * 40})
    hashes = lineage.row_hashes(rows)
    trained = set(zip(rows["id"][:30], hashes[:30], strict=True))  # s0..s29 trained before
    rows.loc[3, "input_ids"] = [99, 100]  # s3 edited: same id, other tokens
    picked, new, replayed = lineage.select(rows, trained, 0.5, seed="key-a")
    assert new == 11 and replayed == 6 and len(picked) == 17  # s30..s39 and the edited s3; half as many replayed
    again, _, _ = lineage.select(rows, trained, 0.5, seed="key-a")
    other, _, _ = lineage.select(rows, trained, 0.5, seed="key-b")
    assert list(again["id"]) == list(picked["id"]) and list(other["id"]) != list(picked["id"])
    assert "s3" in set(picked["id"])
    ids = [int(i[1:]) for i in picked["id"]]
    assert lineage.select(rows, trained, 4, seed="key-a")[2] == 4  # an integer is a row count
    draws = {int(i[1:]) for seed in range(20) for i in lineage.select(rows, trained, 0.5, seed=str(seed))[0]["id"]}
    assert min(draws) == 0 and {i for i in range(30) if i != 3} <= draws  # from the whole history, not the last rows
    assert ids == sorted(ids)  # in the rows' order


@pytest.mark.integration
def test_a_continued_night_trains_the_champion_on_new_and_replayed_rows(night2, demo_run):
    import torch

    cfg, night1, refs = night2
    store = ArtifactStore(cfg.artifact_root)
    ref = refs["train"]
    manifest = store.manifest("train", ref.key)
    assert manifest["init"] == night1 and manifest["upstream"]["parent"] == night1
    rows = manifest["rows"]
    new = rows["new"]
    assert new == len(EDITED)  # the edited seeds, and nothing else, are new
    assert rows["replay"] == round(0.5 * new) and rows["trained"] == new + rows["replay"]
    trained = lineage.trained_rows(store, ref.key)
    assert len(trained) == 32 + new and lineage.trained_rows(store, night1) < trained  # the chain's rows, and tonight's
    assert {i for i, _ in trained - lineage.trained_rows(store, night1)} == set(EDITED)
    m = ref.summary
    assert m["start"] == f"continues {night1} (adapter 2 of its chain)"
    assert m["tokens_trained"] == round(m["tokens_per_epoch"] * m["epochs"]) and m["optimizer_steps"] == m["steps"] > 0
    full = store.manifest("train", night1)["metrics"]
    assert m["tokens_trained"] < 0.3 * full["tokens_trained"]  # 6 rows x 20 epochs against 32 x 60

    # its adapter is the champion's plus an update: unlike both the champion and a fresh adapter, and far
    # nearer the champion than a fresh start would be
    from peft import get_peft_model, get_peft_model_state_dict

    from synthtune.stages.train import Runtime, load_student, lora_config

    ours, champion = _tensors(f"{ref.uri}/adapter"), _tensors(f"{demo_run[1]['train'].uri}/adapter")
    torch.manual_seed(cfg.train.seed)
    fresh = get_peft_model(load_student(cfg.student, Runtime("cpu", "none", "float32", False, False, None)),
                           lora_config(cfg.train))
    fresh = {k: v for k, v in get_peft_model_state_dict(fresh).items()}
    assert ours.keys() == champion.keys() == fresh.keys()
    dist = {name: sum(float((ours[k] - other[k]).norm()) for k in ours) for name, other in
            (("champion", champion), ("fresh", fresh))}
    assert 0 < dist["champion"] < dist["fresh"] / 2, dist
    card = store.fs.cat_file(store.path("train", ref.key, "adapter", "README.md")).decode()
    assert "## Lineage" in card and f"`{night1}`" in card and f"{new} new, {rows['replay']} replayed" in card

    from typer.testing import CliRunner

    from synthtune.cli import app

    shown = CliRunner().invoke(app, ["show", str(DEMO), f"artifact_root={cfg.artifact_root}"])
    assert f"{ref.key} ({new} new + {rows['replay']} replayed) <- {night1} (32 rows) <- base" in shown.output
    listed = CliRunner().invoke(app, ["models", str(DEMO), f"artifact_root={cfg.artifact_root}"])
    assert listed.output.count("continues") == 1  # the start column: night 2's row

    assert plan(cfg)["train"] == ref.key  # a rerun of the night: the same key (it starts where it started)
    assert run_all(cfg, until="train")["train"].reused


@pytest.mark.integration
def test_a_different_lora_shape_fails_before_training_naming_the_field(night2):
    from synthtune.stages import preflight

    cfg, _, refs = night2
    store = ArtifactStore(cfg.artifact_root)
    champion = Registry(store, "demo").champion()["train_key"]
    other = load_config(DEMO, [f"artifact_root={cfg.artifact_root}", f"generate.seeds={cfg.generate.seeds}",
                               *CONTINUED, "train.lora.r=8"])
    problems = preflight.lineage_problems(other, store)
    assert problems == [f"train.lora.r is 8, but the champion {champion} that train.init: champion continues has r "
                        "16: set train.lora.r: 16, or train.init: base for a new adapter"]
    parent = store.ref("train", champion)
    k = train.key(other, {"template": refs["template"].digest, "parent": parent.digest})
    with pytest.raises(ValueError, match=r"train.lora.r is 8, but the champion .* has r 16"):
        train.run(other, store, {"template": refs["template"], "parent": parent})
    assert not (train.work_dir(store, k) / "spec.json").exists()  # no child was started


@pytest.mark.integration
def test_a_night_with_nothing_new_keeps_the_parent_s_adapter(night2, demo_run):
    cfg, night1, _ = night2
    store = ArtifactStore(cfg.artifact_root)
    rows = demo_run[1]["template"]  # night 1's own rows: all trained already
    ref = train.run(cfg, store, {"template": store.ref("template", rows.key), "parent": store.ref("train", night1)})
    assert ref.summary["rows"] == {"trained": 0, "new": 0, "replay": 0} and ref.summary["optimizer_steps"] == 0
    assert ref.summary["note"] == f"nothing new since {night1}: its adapter, unchanged"
    assert _tensors(f"{ref.uri}/adapter").keys() == _tensors(store.path("train", night1, "adapter")).keys()
    import torch

    ours, theirs = _tensors(f"{ref.uri}/adapter"), _tensors(store.path("train", night1, "adapter"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.integration
def test_rollback_then_the_next_night_continues_the_restored_champion(night2, tmp_path):
    cfg, night1, refs = night2
    root = tmp_path / "artifacts"
    shutil.copytree(cfg.artifact_root, root, ignore=shutil.ignore_patterns(".prefect-results", ".locks"))
    night3 = cfg.model_copy(update={"artifact_root": str(root), "generate": cfg.generate.model_copy(
        update={"seeds": str(_seeds(tmp_path / "seeds", (*EDITED, "f30")))}),  # one more seed edited
        "train": cfg.train.model_copy(update={"continue_epochs": 1.0})})  # where it starts is what counts here
    registry = Registry(ArtifactStore(str(root)), "demo")
    assert registry.champion()["train_key"] == refs["train"].key  # night 2 is in service
    run_all(night3, until="template")  # tonight's rows exist: the keys planned are final
    before = plan(night3)["train"]  # night 3 would continue night 2
    registry.rollback(to=night1)
    after = plan(night3)
    assert after["train"] != before  # the parent is in the key: a rollback moves it
    ref = run_all(night3, until="train")["train"]
    manifest = ArtifactStore(str(root)).manifest("train", ref.key)
    assert ref.key == after["train"] and manifest["init"] == night1 and manifest["upstream"]["parent"] == night1
    assert manifest["rows"]["new"] == len(EDITED) + 1  # night 1's chain never saw any edited seed


@pytest.mark.integration
def test_rebase_every_two_alternates_base_and_continued(night2, tmp_path):
    cfg, night1, refs = night2
    store = ArtifactStore(cfg.artifact_root)
    night2_key = refs["train"].key
    two = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rebase_every": 2})})
    assert lineage.depth(store, night1) == 0 and lineage.depth(store, night2_key) == 1
    # night 2 (continued) is in service: a chain of 2 is full, the next night starts from base on all rows
    start = lineage.start(two, store, "another night's rows")
    assert start.parent is None and "rebase night" in start.why
    # a third night (one more seed edited): the very key of a night from base
    seeds = _seeds(tmp_path / "seeds", (*EDITED, "f30"))
    night3 = two.model_copy(update={"generate": two.generate.model_copy(update={"seeds": str(seeds)})})
    from_base = night3.model_copy(update={"train": night3.train.model_copy(update={"init": "base", "data": "all"})})
    assert plan(night3)["train"] == plan(from_base)["train"] != plan(two)["train"]
    # ... and once a from-base adapter is in service, the night after it continues it
    Registry(store, "demo").rollback(to=night1)
    try:
        start = lineage.start(two, store, "another night's rows")
        assert start.parent is not None and start.parent.key == night1
    finally:
        Registry(store, "demo").rollback(to=night2_key)


@pytest.mark.integration
def test_a_crashed_continued_night_retries_on_the_same_rows(night2, monkeypatch, tmp_path):
    cfg, night1, refs = night2
    root = tmp_path / "artifacts"
    shutil.copytree(cfg.artifact_root, root, ignore=shutil.ignore_patterns(".prefect-results", ".locks"))
    Registry(ArtifactStore(str(root)), "demo").rollback(to=night1)
    cfg = cfg.model_copy(update={"artifact_root": str(root),
                                 "train": cfg.train.model_copy(update={"replay": 10, "seed": 3, "continue_epochs": 1.0})})
    store = ArtifactStore(str(root))
    k = plan(cfg)["train"]
    inject(monkeypatch, tmp_path / "site", CRASH_AT_START)
    with pytest.raises(RuntimeError, match="training failed"):
        run_all(cfg, until="train")
    given = pd.read_parquet(train.work_dir(store, k) / "rows.parquet")  # what the crashed child was to train on
    monkeypatch.undo()  # the fault is gone: the retry
    ref = run_all(cfg, until="train")["train"]
    assert ref.key == k and ref.summary["rows"] == {"trained": len(EDITED) + 10, "new": len(EDITED), "replay": 10}
    tonight = lineage.trained_rows(store, k) - lineage.trained_rows(store, night1)
    assert {i for i, _ in tonight} == set(EDITED)
    replayed = set(given["id"]) - set(EDITED)
    assert len(replayed) == 10
    retried, _, _ = lineage.select(pd.read_parquet(f"{refs['template'].uri}/data.parquet"),
                                   lineage.trained_rows(store, night1), 10, seed=k)
    assert list(retried["id"]) == list(given["id"])  # the same rows, in the same order


@pytest.mark.integration
def test_dpo_continued_from_the_champion_uses_it_as_reference(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    templated = demo_preference_pairs(demo_cfg)
    dpo = demo_cfg.train.model_copy(update={"mode": "dpo", "epochs": 10.0, "learning_rate": 0.005, "beta": 1.0,
                                            "logging_steps": 1})
    champion = train.run(demo_cfg.model_copy(update={"train": dpo}), store, {"template": templated})
    logged = [h for h in json.loads(open(f"{champion.uri}/loss_history.json").read()) if "loss" in h]
    # it prefers chosen far more than base does: against base as reference its margins would be far from 0
    assert sum(h["rewards/margins"] for h in logged[-5:]) / 5 > 1.0
    cont = demo_cfg.model_copy(update={"train": dpo.model_copy(update={"init": "champion", "data": "all",
                                                                        "max_steps": 1})})
    ref = train.run(cont, store, {"template": templated, "parent": champion})
    assert ref.summary["reference"] == "base + the adapter it continues" and ref.summary["init"] == champion.key
    # at the first step the policy is its reference: no margin, and DPO's loss is exactly -log sigmoid(0)
    first = next(h for h in json.loads(open(f"{ref.uri}/loss_history.json").read()) if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3) and abs(first["rewards/margins"]) < 1e-3
