"""Loading a pipeline: YAML with `a.b.c=value` overrides, validated into `PipelineConfig`.

The schemas live in `synthtune.configs` (one section per stage). Relative paths of input files
resolve against the folder of the YAML they were loaded from (or the working directory when the
config comes from elsewhere, e.g. a Prefect parameter form).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from synthtune.configs import PipelineConfig

__all__ = ["ConfigError", "PipelineConfig", "apply_overrides", "load_config", "read_yaml", "to_yaml"]


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
