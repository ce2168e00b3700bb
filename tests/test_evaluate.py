"""evaluate: the stage's numbers are the harness's own; tasks are validated before any model loads."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthtune.eval_tasks import check_tasks, portable_task_dir
from synthtune.stages.evaluate import cli_command, lm_eval_args, own_tasks


def test_broken_task_yaml_fails_with_file_and_reason(demo_cfg, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(demo_cfg.evaluate.task_dir, tasks)
    (tasks / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    (tasks / "nameless.yaml").write_text("dataset_path: json\n")
    problems = check_tasks(demo_cfg.evaluate.tasks, tasks)
    assert any(p.startswith(f"{tasks / 'broken.yaml'}: not valid YAML") for p in problems), problems
    assert any(p.startswith(f"{tasks / 'nameless.yaml'}: no `task:`") for p in problems), problems


def test_missing_task_data_file_is_named(demo_cfg, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: demo_facts\ndataset_path: json\noutput_type: multiple_choice\n"
                                  "doc_to_text: q\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\n")
    problems = check_tasks(demo_cfg.evaluate.tasks, tasks)
    assert problems == [f"evaluate task 'demo_facts' ({tasks / 't.yaml'}): data file not found: {tasks / 'nowhere.jsonl'}"]


def test_base_and_tuned_flags_differ_only_by_the_adapter(demo_cfg, tmp_path):
    base = lm_eval_args(demo_cfg, None, tmp_path)
    tuned = lm_eval_args(demo_cfg, tmp_path / "adapter", tmp_path)
    assert tuned["model_args"].pop("peft") == str(tmp_path / "adapter")
    assert base == tuned


def _on(cfg, backend):
    return cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"backend": backend})})


def test_vllm_backend_serves_the_adapter_as_a_lora_and_is_its_own_key(demo_cfg, tmp_path):
    from synthtune.stages import evaluate

    vllm = _on(demo_cfg, "vllm")
    base, tuned = lm_eval_args(vllm, None, tmp_path), lm_eval_args(vllm, tmp_path / "adapter", tmp_path)
    assert base["model"] == tuned["model"] == "vllm"
    assert tuned["model_args"]["lora_local_path"] == str(tmp_path / "adapter") and tuned["model_args"]["enable_lora"]
    assert tuned["model_args"]["max_lora_rank"] >= demo_cfg.train.lora.r and not base["model_args"]["enable_lora"]
    assert {k: v for k, v in base.items() if k != "model_args"} == {k: v for k, v in tuned.items() if k != "model_args"}
    assert evaluate.key(vllm, {}) != evaluate.key(demo_cfg, {})  # scores from two backends never share a key


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_is_refused_where_vllm_is_not_installed(demo_cfg, tmp_path):
    from synthtune.stages import evaluate, preflight
    from synthtune.store import ArtifactStore

    vllm = _on(demo_cfg, "vllm").model_copy(update={"artifact_root": str(tmp_path / "a")})
    problems, _ = preflight.checks(vllm, ArtifactStore(vllm.artifact_root))
    assert any(p.startswith("evaluate.backend: vllm needs vLLM, which is not installed here: `pip install "
                            "'synthtune[vllm]'`") for p in problems), problems
    with pytest.raises(ValueError, match="evaluate.backend: vllm needs vLLM"):
        evaluate.run(vllm, ArtifactStore(vllm.artifact_root))


def test_the_gate_refuses_scores_from_two_backends(demo_cfg, tmp_path):
    from synthtune.stages import promote
    from synthtune.store import ArtifactRef, ArtifactStore

    cfg = demo_cfg.model_copy(update={"artifact_root": str(tmp_path / "a")})
    scores = {"demo_facts": {"acc": 0.5}}
    base = ArtifactRef(stage="evaluate", key="b", uri="-", digest="db", summary={"scores": scores, "backend": "hf"})
    tuned = ArtifactRef(stage="evaluate", key="t", uri="-", digest="dt", summary={"scores": scores, "backend": "vllm"})
    train = ArtifactRef(stage="train", key="tr", uri="-", digest="dtr")
    with pytest.raises(ValueError, match=r"refusing to compare scores from different evaluate backends \(base hf, "
                                         r"tuned vllm\)"):
        promote.run(cfg, ArtifactStore(cfg.artifact_root), {"base": base, "tuned": tuned, "train": train})


def test_portable_task_dir_makes_data_files_absolute(demo_cfg, tmp_path):
    out = portable_task_dir(demo_cfg.evaluate.task_dir, tmp_path / "copy")
    text = (out / "demo_facts.yaml").read_text()
    data = Path(__file__).resolve().parents[1] / "configs" / "eval_tasks" / "demo_facts.jsonl"
    assert str(data) in text and "test: demo_facts.jsonl" not in text
    assert "doc_to_choice" in text  # the rest of the YAML kept verbatim


@pytest.mark.integration
@pytest.mark.parametrize("model", ["evaluate[base]", "evaluate[tuned]"])
def test_parity_with_the_lm_eval_cli(demo_run, tmp_path, model):
    """Same model, task and flags through `lm_eval` itself: identical numbers, to the last digit."""
    cfg, refs = demo_run
    ref = refs[model]
    ours = json.loads(open(f"{ref.uri}/results.json").read())["results"]
    adapter = Path(refs["train"].uri) / "adapter" if model.endswith("[tuned]") else None
    include = portable_task_dir(cfg.evaluate.task_dir, tmp_path / "tasks")
    args = lm_eval_args(cfg, adapter, include)
    args["tasks"] += own_tasks(cfg, include, None)  # the forgetting sample, as the stage adds it
    assert "forgetting" in args["tasks"]
    cmd = cli_command(args, str(include), str(tmp_path / "out"))
    cmd[0] = str(Path(sys.executable).parent / "lm_eval")
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    theirs = json.loads(open(glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)[0]).read())
    assert theirs["results"] == ours
    assert theirs["results"]["demo_facts"]["acc,none"] == ref.summary["scores"]["demo_facts"]["acc"]


def _in_domain(cfg, fraction=0.2):
    return cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"holdout_fraction": fraction}),
                                  "evaluate": cfg.evaluate.model_copy(update={"in_domain": True})})


def test_base_key_ignores_the_data_unless_in_domain_is_on(demo_cfg):
    from synthtune.runner import plan

    def changed_filter(cfg):
        return cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"max_tokens": 40})})

    assert plan(changed_filter(demo_cfg))["evaluate[base]"] == plan(demo_cfg)["evaluate[base]"]
    on = _in_domain(demo_cfg)
    assert plan(changed_filter(on))["evaluate[base]"] != plan(on)["evaluate[base]"]


def test_in_domain_needs_a_holdout():
    from synthtune.config import ConfigError, load_config
    from tests.support import DEMO

    with pytest.raises(ConfigError, match="set filter.holdout_fraction > 0"):
        load_config(DEMO, ["evaluate.in_domain=true"])
    cfg = load_config(DEMO, ["evaluate.in_domain=true", "filter.holdout_fraction=0.1", "promote.guard_tasks=[in_domain]"])
    assert cfg.promote.guard_tasks == ["in_domain"]


@pytest.mark.integration
def test_in_domain_task_from_held_out_rows(demo_run):
    import pandas as pd

    from synthtune.stages import evaluate, filter
    from synthtune.store import ArtifactStore

    cfg, refs = demo_run
    on = _in_domain(cfg)
    store = ArtifactStore(cfg.artifact_root)
    filtered = filter.run(on, store, {"generate": refs["generate"]})
    # the seeds whose id hashes under 0.2 (f05, f15, f20, f29, f31), whatever else is in the data
    assert filtered.summary["rows"]["heldout"] == 5 and filtered.summary["rows"]["kept"] == 27
    held = pd.read_parquet(f"{filtered.uri}/heldout.parquet")
    train_ids = set(pd.read_parquet(f"{filtered.uri}/data.parquet")["id"])
    assert not set(held["id"]) & train_ids  # never trained on
    ref = evaluate.run(on, store, {"filter": filtered})
    scores = ref.summary["scores"]
    assert set(scores) == {"demo_facts", "in_domain", "forgetting"}
    assert scores["demo_facts"] == refs["evaluate[base]"].summary["scores"]["demo_facts"]  # same flags, same numbers
    assert scores["in_domain"]["perplexity"] > 1 and 0 <= scores["in_domain"]["acc"] <= 1
    samples = [json.loads(line) for line in open(f"{ref.uri}/samples_in_domain.jsonl")]
    assert sorted(s["doc"]["id"] for s in samples) == sorted(held["id"])
    assert {s["doc"]["slice"] for s in samples} == {"demo.jsonl"}  # sliced by seed file (one here)


def test_scores_keep_filters_apart():
    from synthtune.stages.evaluate import scores

    results = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                                     "exact_match_stderr,strict-match": 0.01, "exact_match,flexible-extract": 0.5},
                           "arc": {"acc,none": 0.7, "acc_stderr,none": 0.02}}}
    assert scores(results) == {"gsm8k": {"exact_match[strict-match]": 0.25, "exact_match[strict-match]_stderr": 0.01,
                                         "exact_match[flexible-extract]": 0.5},
                               "arc": {"acc": 0.7, "acc_stderr": 0.02}}


def test_in_domain_items_carry_their_slice_and_the_templates_lead_in(tmp_path):
    """Each held-out row's slice is its seed's `evaluate.slice_field` value (else its seed file), and its
    reply starts with what the chat template puts before a reply (lm-eval ignores target_delimiter for
    loglikelihood requests)."""
    import pandas as pd

    from synthtune.eval_tasks import in_domain_task
    from synthtune.seeds import field_values

    heldout = pd.DataFrame([{"id": "a", "prompt": "p1", "response": "r1", "seed_file": "geo.jsonl"},
                            {"id": "b", "prompt": "p2", "response": "r2", "seed_file": "kings.jsonl"}])
    in_domain_task(heldout, tmp_path / "by_file", " ")
    rows = [json.loads(line) for line in (tmp_path / "by_file" / "in_domain.jsonl").read_text().splitlines()]
    assert [(r["slice"], r["response"]) for r in rows] == [("geo.jsonl", " r1"), ("kings.jsonl", " r2")]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "prompt": "p1", "topic": "capitals"}\n{"id": "b", "prompt": "p2"}\n')
    assert field_values(str(seeds), "topic") == {"a": "capitals"}
    in_domain_task(heldout, tmp_path / "by_topic", "", field_values(str(seeds), "topic"))
    rows = [json.loads(line) for line in (tmp_path / "by_topic" / "in_domain.jsonl").read_text().splitlines()]
    assert [(r["slice"], r["response"]) for r in rows] == [("capitals", "r1"), (None, "r2")]
