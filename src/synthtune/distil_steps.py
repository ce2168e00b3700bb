"""distilabel steps of our own. Imported only where distilabel runs (the generate stage's child
process and distilabel's workers, which rebuild steps by module path)."""

# no `from __future__ import annotations`: distilabel reads the `StepInput` hint of process() at runtime

from typing import Any

from distilabel.steps import Step, StepInput


def step_failed(row: dict[str, Any]) -> bool:
    """A row distilabel imputed after its task raised: every output None, `model_name` included
    (a reply that only failed to parse keeps its model name; an empty reply is text)."""
    return row.get("model_name") is None


class SaveBatches(Step):
    """Writes the finished rows of every batch it sees into the row cache at `folder` (any fsspec
    URL) as one new shard, then passes the batch on. Each input's `id` is its cache key. Rows of a
    failed batch, and rows whose `required` fields came back empty, are not written: a retry (or the
    next night) asks for exactly those again."""

    folder: str
    fields: list[str]
    required: list[str] = []

    @property
    def inputs(self) -> list[str]:
        return ["id"]

    @property
    def outputs(self) -> list[str]:
        return []

    def process(self, inputs: StepInput):  # type: ignore[override]  # noqa: D102
        from synthtune.rowcache import RowCache

        def present(value) -> bool:
            if isinstance(value, str):
                return bool(value.strip())
            if isinstance(value, list | tuple):
                return any(v is not None for v in value)
            return value is not None

        def usable(row) -> bool:
            return not step_failed(row) and all(present(row.get(f)) for f in self.required)

        RowCache(self.folder).write([{"key": row["id"], **{f: row.get(f) for f in self.fields}}
                                     for row in inputs if usable(row)])
        yield inputs
