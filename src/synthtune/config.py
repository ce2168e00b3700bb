"""Pipeline configuration: one typed model per stage, loaded from YAML with `a.b.c=value` overrides.

Every model forbids unknown keys (a typo is an error), is frozen, and describes each field once:
the description is what the Prefect parameter form and `--help` show.

Relative paths of input files resolve against the folder of the YAML they were loaded from (or
the working directory when the config comes from elsewhere, e.g. a Prefect parameter form).
Fields created with `field(..., affects_output=False)` are left out of the stage cache key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from synthtune import STAGES
from synthtune.fields import ModelRef, Section, field
from synthtune.stages.evaluate import IN_DOMAIN, EvaluateConfig
from synthtune.stages.filter import FilterConfig
from synthtune.stages.generate import GenerateConfig
from synthtune.stages.preflight import PreflightConfig
from synthtune.stages.promote import PromoteConfig
from synthtune.stages.template import TemplateConfig
from synthtune.stages.train import TrainConfig
from synthtune.tracking import TrackingConfig


class PipelineConfig(Section):
    """The whole post-training loop: one section per stage."""

    name: str = field("synthtune", "Name of this pipeline, shown in run names and reports.", affects_output=False)
    student: ModelRef = field(
        ..., "Student model: a Hugging Face id, a local folder, or `tiny:student` (the demo's locally built model)."
    )
    student_revision: str | None = field(
        None, "Hub revision (branch, tag or commit) of the student, pinned for every load and in the cache keys. "
        "Empty: the default branch, keyed by the commit the local Hugging Face cache knows.")
    artifact_root: str = field(
        ".synthtune/artifacts",
        "Where every stage writes: a local folder or any fsspec URL (s3://, gs://). A relative folder resolves "
        "against the working directory of the command (or worker) that runs, not the YAML's folder.",
        affects_output=False,
    )
    preflight: PreflightConfig = field(default_factory=PreflightConfig, description="Checks before any work.")
    generate: GenerateConfig = field(..., description="Synthetic data from a teacher through distilabel.")
    filter: FilterConfig = field(default_factory=FilterConfig, description="What synthetic rows are kept.")
    template: TemplateConfig = field(default_factory=TemplateConfig, description="Chat template and lengths.")
    train: TrainConfig = field(default_factory=TrainConfig, description="LoRA / QLoRA fine-tuning.")
    evaluate: EvaluateConfig = field(..., description="lm-eval, base vs champion vs tuned, identical flags.")
    promote: PromoteConfig = field(..., description="When a candidate becomes the champion.")
    tracking: TrackingConfig = field(default_factory=TrackingConfig,
                                     description="Experiment tracking (MLflow, TRL report_to); in no cache key.")

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if not self.artifact_root.strip():
            raise ValueError("artifact_root is empty: name a folder or an fsspec URL (s3://bucket/path)")
        if "{{" in self.artifact_root:  # a deployment parameter whose env var was unset at deploy time
            raise ValueError(f"artifact_root '{self.artifact_root}' is an unfilled template: set "
                             "SYNTHTUNE_ARTIFACT_ROOT before `prefect deploy`, or edit the deployment's parameters")
        tasks = [*self.evaluate.tasks, *([IN_DOMAIN] if self.evaluate.in_domain else [])]
        if self.promote.target_task not in tasks:
            raise ValueError(f"promote.target_task '{self.promote.target_task}' is not in evaluate.tasks {tasks}")
        unknown_guards = [g for g in self.promote.guard_tasks if g not in tasks]
        if unknown_guards:
            raise ValueError(f"promote.guard_tasks {unknown_guards} are not in evaluate.tasks {tasks}")
        if self.evaluate.in_domain and self.filter.holdout_fraction == 0:
            raise ValueError("evaluate.in_domain needs held-out rows: set filter.holdout_fraction > 0")
        return self


assert tuple(k for k in PipelineConfig.model_fields if k in STAGES) == STAGES


class ConfigError(ValueError):
    """A config that cannot be used; the message names every field or file at fault."""


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like a.b.c=value")
    path, raw = text.split("=", 1)
    return path.strip().split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` overrides (values parsed as YAML) into a nested dict."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with a key given twice in one mapping refused (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"while reading the mapping at line {node.start_mark.line + 1}", node.start_mark,
                    f"'{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "the second would replace the first", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline YAML, apply overrides, validate. Raises ConfigError naming each bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = read_yaml(path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
