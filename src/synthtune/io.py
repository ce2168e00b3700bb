"""Small readers shared by stages: JSONL with row-level errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Rows of a JSONL file, and the lines that are not JSON objects (as quarantine records)."""
    rows, bad = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"file": str(path), "line": lineno, "reason": f"not JSON: {e.msg}", "raw": line[:500]})
                continue
            if not isinstance(row, dict):
                bad.append({"file": str(path), "line": lineno, "reason": "not a JSON object", "raw": line[:500]})
                continue
            rows.append({**row, "_line": lineno})
    return rows, bad
