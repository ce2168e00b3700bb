"""`synthtune fields [SECTION]`: every config field with its type, default and description, read from
the config classes themselves, so it is never out of date."""

from __future__ import annotations

import types
import typing
from typing import Annotated

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from rich.markup import escape
from rich.table import Table

from synthtune.cli.common import app, console, fail
from synthtune.fields import content_kind

KINDS = {"file": "file", "dir": "folder", "path": "file or folder", "sources": "seed source"}


def _type(annotation) -> str:
    """A field's type for people: `int`, `str | None`, `'sft' | 'dpo'`, `list[str]`, `file`."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        kind = content_kind(annotation)  # an input file or folder: what it is, not `Path`
        return KINDS[kind] if kind else _type(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every field, nested sections flattened."""
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += rows(info.annotation, f"{prefix}{name}.")
            continue
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "(required)"
        elif info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = repr(info.default)
        out.append((f"{prefix}{name}", _type(info.rebuild_annotation()), default, info.description or ""))
    return out


@app.command()
def fields(section: Annotated[str | None, typer.Argument(
        help="A section (generate, filter, template, train, evaluate, promote, tracking, preflight) or a dotted "
             "prefix (train.lora). All fields when omitted.")] = None) -> None:
    """Every config field: its type, default and what it does."""
    from synthtune.configs import PipelineConfig

    found = [r for r in rows(PipelineConfig) if section is None or r[0] == section or r[0].startswith(f"{section}.")]
    if not found:
        sections = sorted({r[0].split(".")[0] for r in rows(PipelineConfig) if "." in r[0]})
        raise fail(f"fields: no field under '{section}'; sections: {', '.join(sections)}")
    table = Table(title=f"synthtune config fields{f' ({section})' if section else ''}", show_lines=False)
    for col in ("field", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for name, kind, default, description in found:
        table.add_row(name, escape(kind), escape(default), escape(description))
    console.print(table)
