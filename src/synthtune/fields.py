"""Building blocks for typed configs: frozen sections, described fields, input files hashed by content."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


def field(default: Any = ..., description: str = "", *, affects_output: bool = True, **kw: Any) -> Any:
    """A pydantic Field with its description; `affects_output=False` keeps it out of cache keys."""
    extra = {} if affects_output else {"affects_output": False}
    return Field(default, description=description, json_schema_extra=extra or None, **kw)


def _resolve_existing(kind: str):
    def check(path: Path, info: ValidationInfo) -> Path:
        base = Path((info.context or {}).get("base_dir") or os.getcwd())
        path = Path(os.path.expanduser(str(path)))
        if not path.is_absolute():
            path = (base / path).resolve()
        if kind == "file" and not path.is_file():
            raise ValueError(f"file not found: {path} (relative paths resolve against {base})")
        if kind == "dir" and not path.is_dir():
            raise ValueError(f"folder not found: {path} (relative paths resolve against {base})")
        return path

    return check


# Marked so the cache key hashes what is inside them, never their path.
InputFile = Annotated[Path, AfterValidator(_resolve_existing("file")), Field(json_schema_extra={"content": "file"})]
InputDir = Annotated[Path, AfterValidator(_resolve_existing("dir")), Field(json_schema_extra={"content": "dir"})]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


