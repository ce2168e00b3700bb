"""The typed settings of every stage, below the stages: `synthtune.stages.*` and the loaders import
these; nothing here imports a stage (tests/test_architecture.py keeps it so)."""

from synthtune.configs.cost import CostConfig
from synthtune.configs.evaluate import FORGETTING, IN_DOMAIN, EvaluateConfig
from synthtune.configs.filter import FilterConfig
from synthtune.configs.generate import GenerateConfig
from synthtune.configs.pipeline import PipelineConfig
from synthtune.configs.preflight import PreflightConfig
from synthtune.configs.promote import PromoteConfig
from synthtune.configs.template import TemplateConfig
from synthtune.configs.tracking import TrackingConfig
from synthtune.configs.train import LoraParams, TrainConfig

__all__ = ["FORGETTING", "IN_DOMAIN", "CostConfig", "EvaluateConfig", "FilterConfig", "GenerateConfig", "LoraParams",
           "PipelineConfig", "PreflightConfig", "PromoteConfig", "TemplateConfig", "TrackingConfig", "TrainConfig"]
