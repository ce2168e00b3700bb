"""distilabel steps of our own. Imported only where distilabel runs (the generate stage's child
process and distilabel's workers, which rebuild steps by module path)."""

# no `from __future__ import annotations`: distilabel reads the `StepInput` hint of process() at runtime

import uuid
from typing import Any

from distilabel.steps import Step, StepInput


def step_failed(row: dict[str, Any]) -> bool:
    """A row distilabel imputed after its task raised: every output None, `model_name` included
    (a reply that only failed to parse keeps its model name; an empty reply is text)."""
    return row.get("model_name") is None


class SaveBatches(Step):
    """Writes the finished rows of every batch it sees to `folder` (any fsspec URL) as one parquet
    file, then passes the batch on. Rows of a failed batch are not written, so a retry regenerates
    exactly those; the files already there are what a retry does not redo."""

    folder: str
    columns: list[str]

    @property
    def inputs(self) -> list[str]:
        return ["id"]

    @property
    def outputs(self) -> list[str]:
        return []

    def process(self, inputs: StepInput):  # type: ignore[override]  # noqa: D102
        import fsspec
        import pandas as pd

        done = [{c: row.get(c) for c in self.columns} for row in inputs if not step_failed(row)]
        if done:
            fs, base = fsspec.core.url_to_fs(self.folder)
            fs.makedirs(base, exist_ok=True)
            name = f"{base}/batch-{uuid.uuid4().hex}"
            with fs.open(name + ".tmp", "wb") as f:
                pd.DataFrame(done).to_parquet(f, index=False)
            fs.mv(name + ".tmp", name + ".parquet")  # a half-written file never looks finished
        yield inputs
