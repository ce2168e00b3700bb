"""Seed sources that grow: a file, a folder or a glob on any fsspec URL.

`generate.seeds` may be `data/seeds.jsonl`, `data/seeds/` (every `*.jsonl` and `*.parquet` below it),
`data/seeds/*.jsonl`, or `s3://bucket/seeds/date=*/part-*.parquet`; a folder saved by `datasets`
(`save_to_disk`) is read as one source. Files are read in sorted order and every row remembers its
file (relative to the source's root, so moving the folder changes nothing) and its line.

Rows are checked here, before any model loads: a line that is not UTF-8 or not a JSON object, a
missing or unusable `id` (null, a mapping, a list) and an empty prompt are quarantined with file and
line. The same `id` twice with the same prompt is one seed (the copy is dropped and counted); the
same `id` with different prompts is an error naming both places, since answers would otherwise be
paired with the wrong prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SUFFIXES = (".jsonl", ".parquet")
_GLOB = set("*?[")
_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class SeedError(ValueError):
    """Seeds that cannot be used as they are; the message names the files and lines at fault."""


def is_glob(text: str) -> bool:
    return bool(_GLOB & set(text))


def resolve_source(value: str, base_dir: Path) -> str:
    """A local source made absolute (against the config's folder) and checked to match something;
    a URL (`s3://...`) as it is (listed at run time, before any model loads)."""
    if "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if is_glob(str(path)):
        try:
            list_files(str(path))
        except SeedError:
            raise ValueError(f"'{path}' matches no seed file (*.jsonl or *.parquet; relative paths resolve against "
                             f"{base_dir})") from None
    elif not path.exists():
        raise ValueError(f"file or folder not found: {path} (relative paths resolve against {base_dir})")
    return str(path)


@dataclass(frozen=True)
class SeedFile:
    path: str  # on its filesystem
    name: str  # relative to the source's root: what rows and the cache key record
    datasets: bool = False  # a `datasets` folder (save_to_disk), read as one source


def _fs(source: str):
    import fsspec

    return fsspec.core.url_to_fs(source)


def list_files(source: str) -> list[SeedFile]:
    """The seed files of a source, in sorted order. Raises SeedError when it matches none."""
    fs, path = _fs(source)
    path = path.rstrip("/") or "/"
    if is_glob(path):
        root = path[: min(path.index(c) for c in _GLOB if c in path)].rsplit("/", 1)[0]
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        if any(fs.exists(f"{path}/{m}") for m in _DATASETS_MARKERS):
            return [SeedFile(path, Path(path).name, datasets=True)]
        root = path
        found = sorted(p for p in fs.find(path) if p.endswith(SUFFIXES)
                       and not any(part.startswith(".") for part in p[len(root):].split("/")))
    elif fs.isfile(path):
        return [SeedFile(path, Path(path).name)]
    else:
        raise SeedError(f"generate.seeds: {source} does not exist")
    if not found:
        raise SeedError(f"generate.seeds: {source} matches no seed file (*.jsonl or *.parquet)")
    return [SeedFile(p, p[len(root):].lstrip("/") or Path(p).name) for p in found]


def fingerprint(source: str) -> list[tuple[str, str]]:
    """(name, sha256) of every file of the source: the cache key covers their contents, not where they are."""
    from synthtune.digests import fs_sha256

    fs, _ = _fs(source)
    out = []
    for f in list_files(source):
        if f.datasets:
            out += [(f"{f.name}/{p[len(f.path):].lstrip('/')}", fs_sha256(fs, p)) for p in sorted(fs.find(f.path))]
        else:
            out.append((f.name, fs_sha256(fs, f.path)))
    return out


def _jsonl_records(fs, f: SeedFile):
    """(line number, parsed object or None, problem or None) for each non-blank line, streamed."""
    with fs.open(f.path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM is not part of row 1
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not JSON: {e.msg} (column {e.colno})"
                continue
            yield (lineno, row, None) if isinstance(row, dict) else (lineno, None, "not a JSON object")


def _table_records(fs, f: SeedFile):
    if f.datasets:
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(fs.unstrip_protocol(f.path))
        if isinstance(data, DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        rows = data.to_list()
    else:
        import pyarrow.parquet as pq

        with fs.open(f.path, "rb") as handle:
            rows = pq.read_table(handle).to_pylist()
    for i, row in enumerate(rows, 1):
        yield i, row, None


def records(fs, f: SeedFile):
    """(line or row number, row or None, problem or None) for each row of one seed file."""
    if f.datasets or f.path.endswith(".parquet"):
        return _table_records(fs, f)
    return _jsonl_records(fs, f)


def seed_id(value) -> tuple[str | None, str | None]:
    """(the id as text, or None with why it cannot be one): text or a whole number."""
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        kind = "null" if value is None else type(value).__name__
        return None, f"field 'id' is {kind}, not text or a whole number"
    if isinstance(value, float) and not value.is_integer():
        return None, f"field 'id' is {value}, not text or a whole number"
    text = str(int(value)) if isinstance(value, float) else str(value)
    return (text, None) if text.strip() else (None, "field 'id' is empty")


@dataclass
class SeedSet:
    """Usable seed rows (`id`, `instruction`, `seed_file`, `seed_line`), in source order, and what was not used."""

    rows: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)  # {file, line, id?, reason}
    duplicates: int = 0  # identical repeats (same id, same prompt) dropped
    files: list[str] = field(default_factory=list)


def read_seeds(source: str, prompt_field: str = "prompt", max_conflicts: int = 5) -> SeedSet:
    """Every row of every file of the source. Raises SeedError when ids conflict (naming both places)."""
    fs, _ = _fs(source)
    out = SeedSet()
    first: dict[str, tuple[str, int, str]] = {}  # id -> (file, line, prompt)
    conflicts: list[str] = []
    for f in list_files(source):
        out.files.append(f.name)
        for line, row, problem in records(fs, f):
            where = {"file": f.name, "line": line}
            if problem:
                out.quarantined.append({**where, "reason": problem})
                continue
            if "id" not in row:
                out.quarantined.append({**where, "reason": "missing field 'id'"})
                continue
            sid, why = seed_id(row["id"])
            if why:
                out.quarantined.append({**where, "reason": why})
                continue
            prompt = row.get(prompt_field)
            if not isinstance(prompt, str) or not prompt.strip():
                out.quarantined.append({**where, "id": sid, "reason": f"field '{prompt_field}' missing or not text"})
                continue
            if sid in first:
                seen_file, seen_line, seen_prompt = first[sid]
                if seen_prompt == prompt:
                    out.duplicates += 1
                else:
                    conflicts.append(f"id '{sid}' at {f.name}:{line} has a different prompt than at "
                                     f"{seen_file}:{seen_line}")
                continue
            first[sid] = (f.name, line, prompt)
            out.rows.append({"id": sid, "instruction": prompt, "seed_file": f.name, "seed_line": line})
    if conflicts:
        more = f" (and {len(conflicts) - max_conflicts} more)" if len(conflicts) > max_conflicts else ""
        raise SeedError(f"generate.seeds ({source}): {len(conflicts)} seed id(s) name two different prompts, so "
                        "answers would be paired with the wrong prompt; give each prompt its own id:\n  "
                        + "\n  ".join(conflicts[:max_conflicts]) + more)
    return out


def field_values(source: str, name: str) -> dict[str, str]:
    """Seed id -> the value of field `name` in that seed's row (rows without it are left out)."""
    fs, _ = _fs(source)
    out: dict[str, str] = {}
    for f in list_files(source):
        for _, row, problem in records(fs, f):
            if not problem and row and name in row and row[name] is not None:
                sid, _why = seed_id(row.get("id"))
                if sid is not None:
                    out.setdefault(sid, str(row[name]))
    return out
