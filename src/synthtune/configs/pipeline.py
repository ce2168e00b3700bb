"""The whole pipeline's settings: one section per stage, composed from the sections in this package.

Every model forbids unknown keys (a typo is an error), is frozen, and describes each field once:
the description is what the Prefect parameter form, `synthtune fields` and `--help` show. Fields
created with `field(..., affects_output=False)` are left out of the stage cache keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo, model_validator

from synthtune import STAGES
from synthtune.configs.cost import CostConfig
from synthtune.configs.evaluate import IN_DOMAIN, EvaluateConfig
from synthtune.configs.filter import FilterConfig
from synthtune.configs.generate import GenerateConfig
from synthtune.configs.preflight import PreflightConfig
from synthtune.configs.promote import PromoteConfig
from synthtune.configs.template import TemplateConfig
from synthtune.configs.tracking import TrackingConfig
from synthtune.configs.train import TrainConfig
from synthtune.fields import ModelRef, Section, base_dir, field

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _name(value: str) -> str:
    if not NAME.match(value):
        raise ValueError(f"'{value}' cannot name a pipeline: letters, digits, '.', '_' and '-' (it names the "
                         "pipeline's registry folder, its MLflow model and its Prefect deployments)")
    return value


def _root(value: str, info: ValidationInfo) -> str:
    """A local artifact root made absolute against the YAML's folder (the working directory when the
    config comes from elsewhere); a URL as it is."""
    if "://" in value or not value.strip() or "{{" in value:
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else Path(os.path.normpath(base_dir(info) / path)))


PipelineName = Annotated[str, AfterValidator(_name)]
ArtifactRoot = Annotated[str, AfterValidator(_root)]


class PipelineConfig(Section):
    """The whole post-training loop: one section per stage."""

    name: PipelineName = field(
        "synthtune", "Name of this pipeline: its registry on the artifact root (registry/NAME/: champion, history), "
        "its MLflow model and Prefect deployments, run names and reports. Pipelines sharing an artifact root share "
        "stage outputs, never a champion.", affects_output=False)
    student: ModelRef = field(
        ..., "Student model: a Hugging Face id, a local folder, or `tiny:student` (the demo's locally built model)."
    )
    student_revision: str | None = field(
        None, "Hub revision (branch, tag or commit) of the student, pinned for every load and in the cache keys. "
        "Empty: the default branch, keyed by the commit the local Hugging Face cache knows.")
    artifact_root: ArtifactRoot = field(
        ".synthtune/artifacts",
        "Where every stage writes: a local folder or any fsspec URL (s3://, gs://). A relative folder resolves "
        "against the YAML's folder, like every other path in it (the working directory when the config does not "
        "come from a file). Many pipelines may share one root: each keeps its own registry there.",
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
    cost: CostConfig = field(default_factory=CostConfig,
                             description="Prices and budgets: what a night costs, and when to stop; in no cache key.")

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
