"""Building blocks for typed configs: frozen sections, described fields, input files hashed by content."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


def field(default: Any = ..., description: str = "", *, affects_output: bool = True, resolved: bool = False,
          **kw: Any) -> Any:
    """A pydantic Field with its description. `affects_output=False` keeps it out of cache keys;
    `resolved=True` keys it by what it resolves to on the machine (its stage adds that value), never
    by the literal (`auto` means different things on a CPU box and a GPU box)."""
    extra = {} if affects_output else {"affects_output": False}
    if resolved:
        extra["resolved"] = True
    return Field(default, description=description, json_schema_extra=extra or None, **kw)


def field_flags(info) -> dict:
    """The synthtune flags of a pydantic field (`affects_output`, `resolved`)."""
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


PACKAGED = "synthtune:"


def _resolve_existing(kind: str):
    def check(path: Path, info: ValidationInfo) -> Path:
        base = base_dir(info)
        if str(path).startswith(PACKAGED):  # a file shipped with synthtune (synthtune/data/)
            from importlib import resources

            path = Path(str(resources.files("synthtune.data").joinpath(str(path).removeprefix(PACKAGED))))
        path = Path(os.path.expanduser(str(path)))
        if not path.is_absolute():
            path = (base / path).resolve()
        if kind == "file" and not path.is_file():
            raise ValueError(f"file not found: {path} (relative paths resolve against {base})")
        if kind == "dir" and not path.is_dir():
            raise ValueError(f"folder not found: {path} (relative paths resolve against {base})")
        if kind == "path" and not path.exists():
            raise ValueError(f"file or folder not found: {path} (relative paths resolve against {base})")
        return path

    return check


class ContentHashed:
    """Annotation marker: the cache key hashes what is inside this file or folder, never its path."""

    def __init__(self, kind: str):
        self.kind = kind


def content_kind(annotation: Any) -> str | None:
    """'file', 'dir', 'path' or 'sources' when an annotation (possibly inside Optional/Union) names inputs."""
    if get_origin(annotation) is Annotated:
        return next((m.kind for m in annotation.__metadata__ if isinstance(m, ContentHashed)), None)
    return next((k for a in get_args(annotation) if (k := content_kind(a))), None)


def _resolve_source(value: str, info: ValidationInfo) -> str:
    from synthtune.seeds import resolve_source

    return resolve_source(str(value), base_dir(info))


def looks_like_path(value: str) -> bool:
    """A model reference meant as a folder, not a Hub id (`org/name` or `name`)."""
    return value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or value.count("/") > 1 \
        or "\\" in value


def base_dir(info: ValidationInfo) -> Path:
    """The folder relative input paths resolve against: the YAML's, else the working directory."""
    return Path((info.context or {}).get("base_dir") or os.getcwd())


def resolve_model(value: str, base: Path) -> str:
    """A model reference: `tiny:...`, a Hub id, or a local folder (resolved against `base`, and it
    must exist: transformers would call a missing one an invalid repo id)."""
    if value.startswith("tiny:") or "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else (base / path)
    if looks_like_path(value):
        if not path.is_dir():
            raise ValueError(f"model folder not found: {path.resolve()} (relative paths resolve against {base}; "
                             "a Hub id looks like org/name)")
        return str(path.resolve())
    return str(path.resolve()) if path.is_dir() else value  # an existing local folder wins over the Hub, as in transformers


def _resolve_model(value: str, info: ValidationInfo) -> str:
    return resolve_model(value, base_dir(info))


InputFile = Annotated[Path, AfterValidator(_resolve_existing("file")), ContentHashed("file")]
InputDir = Annotated[Path, AfterValidator(_resolve_existing("dir")), ContentHashed("dir")]
InputPath = Annotated[Path, AfterValidator(_resolve_existing("path")), ContentHashed("path")]  # file or folder
# a file, a folder or a glob, local (resolved against the config's folder) or on any fsspec URL
SeedSource = Annotated[str, AfterValidator(_resolve_source), ContentHashed("sources")]
# a model: `tiny:...`, a Hub id, or a local folder that must exist
ModelRef = Annotated[str, AfterValidator(_resolve_model)]


class Section(BaseModel):
    # inf and nan are refused everywhere (epochs: .inf passed validation and crashed the child)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


