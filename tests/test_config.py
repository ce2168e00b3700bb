"""Configs: every shipped YAML validates; bad input fails early naming the field or file."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtune.cli import app
from synthtune.config import ConfigError, PipelineConfig, load_config
from tests.support import DEMO, ROOT

PIPELINES = sorted((ROOT / "configs").glob("*.yaml"))
EVAL_TASKS = sorted((ROOT / "configs").rglob("eval_tasks/*.yaml"))


def deployed_pipelines() -> list[tuple[str, dict]]:
    """(deployment name, config) of every deployment in deployments/prefect.yaml that carries one."""
    import yaml

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    return [(d["name"], d["parameters"]["config"]) for d in spec["deployments"] if "config" in d.get("parameters", {})]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path: Path):
    cfg = load_config(path)
    assert cfg.promote.target_task in cfg.evaluate.tasks and cfg.generate.seeds
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path}: ok" in " ".join(result.output.split())


@pytest.mark.parametrize("name, raw", deployed_pipelines(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_deployed_pipeline_validates(name, raw, tmp_path):
    import json

    filled = json.loads(json.dumps(raw).replace("{{ $SYNTHTUNE_ARTIFACT_ROOT }}", str(tmp_path)))
    cfg = PipelineConfig.model_validate(filled, context={"base_dir": ROOT})
    assert cfg.artifact_root == str(tmp_path) and cfg.promote.target_task in cfg.evaluate.tasks


def test_every_shipped_eval_task_has_its_data():
    from synthtune.eval_tasks import check_tasks, local_tasks

    assert EVAL_TASKS
    for folder in {p.parent for p in EVAL_TASKS}:
        tasks = local_tasks(folder)
        assert tasks and check_tasks(sorted(tasks), folder) == [], folder


def test_the_checks_fail_on_a_broken_copy(tmp_path):
    """The tests above can fail: a copy with a broken eval task and a bad field is refused."""
    import shutil

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "configs" / "eval_tasks" / "demo_facts.jsonl").unlink()
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "configs" / "demo.yaml")])
    assert result.exit_code == 2 and "data file not found" in result.output
    with pytest.raises(ConfigError, match="train.lora.r"):
        load_config(tmp_path / "configs" / "demo.yaml", ["train.lora.r=0"])


def test_configs_is_self_contained(tmp_path):
    """A copy of configs/ anywhere validates and finds every file it names (seeds, tasks, task data)."""
    import shutil

    from synthtune.eval_tasks import check_tasks

    shutil.copytree(ROOT / "configs", tmp_path / "mine")
    cfg = load_config(tmp_path / "mine" / "demo.yaml")
    assert cfg.generate.seeds.startswith(str(tmp_path)) and str(cfg.evaluate.task_dir).startswith(str(tmp_path))
    assert check_tasks(cfg.evaluate.tasks, cfg.evaluate.task_dir) == []


def test_the_facts_the_teacher_knows_are_the_facts_the_demo_asks():
    packaged = ROOT / "src" / "synthtune" / "data" / "demo_facts.jsonl"
    assert (ROOT / "configs" / "eval_tasks" / "demo_facts.jsonl").read_bytes() == packaged.read_bytes()


def test_shipped_configs_say_what_they_are_and_how_to_run():
    for path in PIPELINES:
        head = path.read_text().splitlines()[:12]
        assert head[0].startswith("#"), f"{path.name} should start with what it is"
        assert any("synthtune run" in line for line in head), f"{path.name} should say the command that runs it"


def test_validate_reports_typo_missing_file_and_range_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "student: tiny:student\n"
        "generate:\n  teacher: tiny:teacher\n  seeds: no_such_seeds.jsonl\n  max_new_tokenz: 32\n"
        "train:\n  lora:\n    r: 0\n"
    )
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    out = result.output
    assert "generate.max_new_tokenz: unknown field" in out
    assert "generate.seeds: file or folder not found" in out and "no_such_seeds.jsonl" in out
    assert "train.lora.r" in out and "greater than or equal to 1" in out


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "seeds.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    (tmp_path / "p.yaml").write_text("student: tiny:student\ngenerate:\n  teacher: tiny:teacher\n  seeds: seeds.jsonl\n"
                                     "evaluate:\n  tasks: [arc_easy]\npromote:\n  target_task: arc_easy\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.generate.seeds == str(tmp_path / "seeds.jsonl")


def test_an_openai_teacher_needs_a_base_url_before_anything_runs():
    with pytest.raises(ConfigError, match="generate: teacher_kind=openai needs base_url"):
        load_config(DEMO, ["generate.teacher_kind=openai"])


def test_overrides_set_nested_values_parsed_as_yaml():
    cfg = load_config(DEMO, ["train.lora.r=8", "train.lora.target_modules=[q_proj, v_proj]", "filter.dedup=false"])
    assert cfg.train.lora.r == 8
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.filter.dedup is False


def test_override_typo_is_an_error_naming_the_path():
    with pytest.raises(ConfigError, match=r"train\.lora\.rank: unknown field"):
        load_config(DEMO, ["train.lora.rank=8"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="promote.target_task 'nope' is not in evaluate.tasks"):
        load_config(DEMO, ["promote.target_task=nope"])
    with pytest.raises(ConfigError, match="min_tokens .* is above max_tokens"):
        load_config(DEMO, ["filter.min_tokens=100", "filter.max_tokens=10"])


def test_configs_are_frozen():
    cfg = load_config(DEMO)
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lora.r = 4  # type: ignore[misc]


def test_every_field_is_described():
    def walk(model, prefix=""):
        for name, info in model.model_fields.items():
            assert info.description, f"{prefix}{name} has no description"
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(PipelineConfig)


@pytest.mark.integration  # indexes lm-eval's registry (~12 s)
def test_unknown_eval_task_is_refused_with_close_matches():
    from synthtune.eval_tasks import check_tasks

    cfg = load_config(DEMO)
    problems = check_tasks(["demo_fact"], cfg.evaluate.task_dir)
    assert problems and "unknown task 'demo_fact'" in problems[0] and "demo_facts" in problems[0]
