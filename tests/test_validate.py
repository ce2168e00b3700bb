"""`synthtune validate` catches, before anything runs, what used to fail late (or never): each case
exits 2 with a message naming the field, file and line; warnings name what they warn about."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtune import __version__
from synthtune.cli import app
from tests.support import ROOT


@pytest.fixture
def configs(tmp_path) -> Path:
    """A copy of configs/ to break."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path / "configs"


def validate(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["validate", *args], env=env)


def one_line(text: str) -> str:
    """Rich wraps long lines on a narrow terminal: undo that for matching."""
    return re.sub(r"\s+", " ", text)


def test_the_shipped_demo_validates_and_says_what_it_read(configs):
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 0, result.output
    out = one_line(result.output)
    assert "seeds: 35 rows from 1 file(s), 0 quarantined, 0 exact duplicates dropped" in out
    assert f"{configs / 'demo.yaml'}: ok" in out


def test_a_metric_no_task_reports_is_refused(configs):
    result = validate(str(configs / "demo.yaml"), "promote.metric=exact_match")
    assert result.exit_code == 2
    assert ("promote.metric 'exact_match': task 'demo_facts' reports ['acc', 'acc_norm'], not 'exact_match'"
            in one_line(result.output))


def test_a_template_field_the_data_lacks_names_the_file_and_line(configs):
    yaml_path = configs / "eval_tasks" / "demo_facts.yaml"
    yaml_path.write_text(yaml_path.read_text().replace('doc_to_text: "{{question}}"',
                                                       'doc_to_text: "{{context}}\\n{{question}}"'))
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 2
    data = configs / "eval_tasks" / "demo_facts.jsonl"
    assert f"doc_to_text reads {{{{context}}}}, which {data}:1 lacks (and 31 more rows)" in one_line(result.output)


def test_a_malformed_eval_data_file_names_its_line(configs):
    data = configs / "eval_tasks" / "demo_facts.jsonl"
    data.write_text(data.read_text() + '{"question": "cut off\n')
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 2
    assert f"evaluate task 'demo_facts': {data}:33: not JSON" in one_line(result.output)


def test_two_task_yamls_defining_one_task_are_refused(configs):
    shutil.copy(configs / "eval_tasks" / "demo_facts.yaml", configs / "eval_tasks" / "copy.yaml")
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 2
    assert "task 'demo_facts' is also defined in" in one_line(result.output)


def test_a_key_given_twice_in_the_yaml_is_refused_naming_both_lines(configs):
    path = configs / "demo.yaml"
    path.write_text(path.read_text() + "\ntrain:\n  epochs: 1\n")
    result = validate(str(path))
    assert result.exit_code == 2
    lines = path.read_text().splitlines()
    first, second = [i + 1 for i, line in enumerate(lines) if line.startswith("train:")]
    assert f"'train' is given twice (lines {first} and {second})" in one_line(result.output)


def test_an_empty_artifact_root_is_refused(configs):
    result = validate(str(configs / "demo.yaml"), "artifact_root=")
    assert result.exit_code == 2 and "artifact_root is empty" in result.output


@pytest.mark.parametrize("field", ["student", "generate.teacher"])
def test_a_model_folder_that_does_not_exist_is_named(configs, field):
    result = validate(str(configs / "demo.yaml"), f"{field}=./models/no-such-model")
    assert result.exit_code == 2
    out = one_line(result.output)
    assert f"{field}: model folder not found: {configs / 'models' / 'no-such-model'}" in out
    assert "Repo id" not in out


def test_a_local_model_folder_resolves_against_the_yaml(configs, tmp_path):
    from synthtune.config import load_config

    (configs / "models" / "mine").mkdir(parents=True)
    cfg = load_config(configs / "demo.yaml", ["student=models/mine", "generate.teacher=./models/mine"])
    assert cfg.student == cfg.generate.teacher == str(configs / "models" / "mine")
    # an endpoint's model names are its own: never checked as folders
    cfg = load_config(configs / "demo.yaml", ["generate.teacher_kind=openai", "generate.base_url=http://x/v1",
                                              "generate.teacher=/models/llama"])
    assert cfg.generate.teacher == "/models/llama"


def test_seed_rows_are_read_and_quarantine_counted(configs):
    seeds = configs / "data" / "seeds" / "demo.jsonl"
    seeds.write_text(seeds.read_text() + "not json\n")
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 0, result.output
    assert "35 rows from 1 file(s), 1 quarantined (first: demo.jsonl:36: not JSON" in one_line(result.output)


def test_conflicting_seed_ids_fail_validate(configs):
    seeds = configs / "data" / "seeds" / "demo.jsonl"
    first = seeds.read_text().splitlines()[0]
    seeds.write_text(seeds.read_text() + first.replace('"prompt": "', '"prompt": "bananas? ') + "\n")
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 2
    assert "has a different prompt than at demo.jsonl:1" in one_line(result.output)


def test_validate_without_a_config_says_which_it_validated():
    result = validate("train.epochs=2")
    assert result.exit_code == 0, result.output
    assert f"{ROOT / 'configs' / 'demo.yaml'}: ok" in one_line(result.output)


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"synthtune {__version__}"


def test_our_default_metrics_are_lm_evals():
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    from synthtune.eval_tasks import DEFAULT_METRICS

    assert DEFAULT_METRICS == DEFAULT_METRIC_REGISTRY


@pytest.mark.integration  # reads lm-eval's whole task registry (about 12 s)
def test_a_registry_task_missing_offline_is_a_warning_naming_its_dataset(configs, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-hf-home" / "datasets"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    result = validate(str(configs / "demo.yaml"), "evaluate.tasks=[demo_facts, hellaswag]",
                      env={"HF_DATASETS_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert ("warning: evaluate task 'hellaswag' reads the Hub dataset 'Rowan/hellaswag', which is not in the local "
            "cache, and HF_DATASETS_OFFLINE is set" in one_line(result.output))
    result = validate(str(configs / "demo.yaml"), "evaluate.tasks=[demo_facts, hellaswag]",
                      "promote.target_task=hellaswag", "promote.metric=exact_match", env={"HF_DATASETS_OFFLINE": "1"})
    assert result.exit_code == 2
    assert "task 'hellaswag' reports ['acc', 'acc_norm']" in one_line(result.output)
