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


def test_an_eval_label_out_of_range_for_its_choices_names_the_line(configs):
    import json

    data = configs / "eval_tasks" / "demo_facts.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[4]["label"] = 4  # four choices: 0..3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 2
    assert f"{data}:5: label 4 is out of range for its 4 choices (0..3)" in one_line(result.output)


def test_a_wrong_base_url_fails_validate_within_seconds_naming_the_field(configs):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = validate(str(configs / "demo.yaml"), "generate.teacher_kind=openai",
                      f"generate.base_url=http://127.0.0.1:{port}/v1", "generate.teacher=some/model")
    assert time.monotonic() - started < 10
    assert result.exit_code == 2
    assert f"generate.base_url: http://127.0.0.1:{port}/v1 is not answering" in one_line(result.output)


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


def test_the_endpoint_check_names_a_model_it_does_not_serve_and_a_refused_key(configs, monkeypatch):
    """What vLLM answers on /models (the served model, 401 without the key), from a small HTTP server."""
    import http.server
    import json
    import threading

    class Models(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer right-key"
            body = json.dumps({"data": [{"id": "org/served-model"}]} if ok else {"error": "bad key"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        args = [str(configs / "demo.yaml"), "generate.teacher_kind=openai", f"generate.base_url={url}",
                "generate.teacher=org/other-model", "generate.api_key_env=SYNTHTUNE_TEST_KEY"]
        monkeypatch.setenv("SYNTHTUNE_TEST_KEY", "wrong-key")
        out = one_line(validate(*args).output)
        assert f"generate.base_url: {url} refused the API key (HTTP 401" in out and "$SYNTHTUNE_TEST_KEY" in out
        monkeypatch.setenv("SYNTHTUNE_TEST_KEY", "right-key")
        result = validate(*args)
        assert result.exit_code == 2
        assert (f"generate.teacher: 'org/other-model' is not served at generate.base_url {url} (it serves: "
                "org/served-model)") in one_line(result.output)
        assert validate(*args[:-2], "generate.teacher=org/served-model", args[-1]).exit_code == 0
    finally:
        server.shutdown()


def test_fields_lists_every_field_with_type_default_and_description(monkeypatch):
    from synthtune.cli.common import console

    monkeypatch.setattr(console, "width", 400)  # one line per field
    result = CliRunner().invoke(app, ["fields", "train"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    assert {"train.beta", "train.mode", "train.lora.r"} <= set(lines)
    assert "'sft' | 'dpo'" in lines["train.mode"] and "`sft` on conversations" in lines["train.mode"]
    assert "│ int " in lines["train.lora.r"] and "LoRA rank." in lines["train.lora.r"]
    assert not any(name.startswith("generate.") for name in lines)
    everything = CliRunner().invoke(app, ["fields"])
    assert "generate.judge_calibration" in everything.output and "promote.max_forgetting" in everything.output
    unknown = CliRunner().invoke(app, ["fields", "trian"])
    assert unknown.exit_code == 2 and "no field under 'trian'" in one_line(unknown.output)


def test_tiny_teacher_on_seeds_it_does_not_know_is_a_warning(configs):
    seeds = configs / "data" / "seeds" / "demo.jsonl"
    seeds.write_text(seeds.read_text() + '{"id": "mine", "prompt": "How do I reset my router?"}\n')
    result = validate(str(configs / "demo.yaml"))
    assert result.exit_code == 0, result.output  # a warning, not an error
    assert ("tiny:teacher, which knows only the demo's 32 facts, but 1 of 36 seed prompts are not among them "
            "(first: 'How do I reset my router?')") in one_line(result.output)
    assert "knows only" not in one_line(validate(str(ROOT / "configs" / "demo.yaml")).output)
