"""lm-eval task YAMLs on disk: find them, check them, read their data, make them portable.

Shared by the stages that read eval tasks (preflight checks them, filter decontaminates against
their items, evaluate runs them), so no stage imports another for it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without running their `!function` tags."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def scan_task_dir(task_dir: Path | None) -> tuple[dict[str, tuple[Path, dict]], list[str]]:
    """(task name -> (YAML file, parsed YAML), problems) for the task YAMLs under task_dir.
    lm-eval skips a broken YAML silently; here it is a problem naming the file and the reason."""
    found: dict[str, tuple[Path, dict]] = {}
    problems: list[str] = []
    for path in sorted(task_dir.rglob("*.yaml")) if task_dir else []:
        try:
            doc = yaml.load(path.read_text(), Loader=_TaskYamlLoader)
        except yaml.YAMLError as e:
            problems.append(f"{path}: not valid YAML ({str(e).splitlines()[0]}); lm-eval would skip it silently")
            continue
        if not isinstance(doc, dict):
            problems.append(f"{path}: expected a mapping of task settings")
        elif isinstance(doc.get("task"), str):
            if doc["task"] in found:
                problems.append(f"{path}: task '{doc['task']}' is also defined in {found[doc['task']][0]}; "
                                "lm-eval would keep one of them silently: rename one")
            found[doc["task"]] = (path, doc)
            missing = [k for k in ("dataset_path", "output_type", "doc_to_text") if k not in doc and "include" not in doc]
            if missing:
                problems.append(f"{path}: task '{doc['task']}' lacks {', '.join(missing)}")
        elif "group" not in doc and "include" not in doc:
            problems.append(f"{path}: no `task:` (or `group:`) key; lm-eval would skip it silently")
    return found, problems


def local_tasks(task_dir: Path | None) -> dict[str, tuple[Path, dict]]:
    """Task name -> (YAML file, parsed YAML) for every valid task YAML under task_dir."""
    return scan_task_dir(task_dir)[0]


def _absolute(folder: Path, files):
    """`data_files` (a path, a list, or a split -> path(s) mapping) with each path made absolute."""
    if isinstance(files, dict):
        return {split: _absolute(folder, v) for split, v in files.items()}
    if isinstance(files, list):
        return [_absolute(folder, v) for v in files]
    p = Path(files)
    return str(p if p.is_absolute() else (folder / p).resolve())


def data_files(path: Path, doc: dict) -> list[Path]:
    """Local data files a task YAML names, resolved against the YAML's folder."""
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        return []
    flat, stack = [], [_absolute(path.parent, files)]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, list):
            stack += item
        else:
            flat.append(Path(item))
    return sorted(flat)


def read_task_rows(path: Path) -> list[dict]:
    """The items of a local JSONL task data file. Raises ValueError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            rows.append(row)
    return rows


def check_tasks(tasks: list[str], task_dir: Path | None) -> list[str]:
    """Problems with the configured tasks, found without loading any model."""
    local, problems = scan_task_dir(task_dir)
    unknown = [t for t in tasks if t not in local]
    for name, (path, doc) in local.items():
        if name in tasks:
            problems += [f"evaluate task '{name}' ({path}): data file not found: {f}"
                         for f in data_files(path, doc) if not f.is_file()]
    if unknown:
        from lm_eval.tasks import TaskManager

        registry = set(TaskManager().all_tasks)
        for name in unknown:
            if name not in registry:
                import difflib

                close = difflib.get_close_matches(name, sorted(registry | set(local)), n=3)
                problems.append(f"evaluate.tasks: unknown task '{name}'" + (f"; did you mean {close}?" if close else ""))
    return problems


def task_data_files(tasks: list[str], task_dir: Path | None) -> list[Path]:
    """Data files of the named local tasks (registry tasks are not read here)."""
    return sorted({f for name, (path, doc) in local_tasks(task_dir).items()
                   if name in tasks for f in data_files(path, doc) if f.is_file()})


def task_documents(tasks: list[str], task_dir: Path | None) -> list[str]:
    """Every string in the named local tasks' items (for decontamination)."""
    docs: list[str] = []

    def strings(value):
        if isinstance(value, str):
            docs.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                strings(v)
        elif isinstance(value, list):
            for v in value:
                strings(v)

    for path in task_data_files(tasks, task_dir):
        for row in read_task_rows(path):
            strings(row)
    return docs


def portable_task_dir(task_dir: Path | None, into: Path) -> Path | None:
    """A copy of task_dir whose task YAMLs name their data files by absolute path (lm-eval resolves
    them against the working directory)."""
    if task_dir is None:
        return None
    shutil.copytree(task_dir, into, dirs_exist_ok=True)
    for path, doc in local_tasks(task_dir).values():
        kwargs = doc.get("dataset_kwargs") or {}
        if not kwargs.get("data_files"):
            continue
        block = yaml.safe_dump({"dataset_kwargs": {**kwargs, "data_files": _absolute(path.parent, kwargs["data_files"])}})
        # swap only the top-level dataset_kwargs block; the rest (and its !function tags) stays verbatim
        out, inside = [], False
        for line in path.read_text().splitlines():
            if line.startswith("dataset_kwargs:"):
                inside = True
                out.append(block.rstrip())
            elif inside and (line[:1] in (" ", "\t") or not line.strip()):
                continue
            else:
                inside = False
                out.append(line)
        (into / path.relative_to(task_dir)).write_text("\n".join(out) + "\n")
    return into
