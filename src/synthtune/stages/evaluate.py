"""evaluate: lm-evaluation-harness on the base student and on the tuned adapter, identical flags.

Tasks are lm-eval registry names or task YAMLs in `evaluate.task_dir`. lm-eval resolves a YAML's
`data_files` against the working directory, so the YAMLs are copied to a temporary folder with
those paths made absolute (relative to the YAML). The base run's key has no adapter in it, so
base scores are reused across nights; the tuned run's key adds the train key.

Run as: synthtune evaluate configs/demo.yaml
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, sha256_file, stage_key
from synthtune.fields import InputDir, Section, field
from synthtune.models import fingerprint, resolve

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "evaluate"
VERSION = "1"


class EvaluateConfig(Section):
    tasks: list[str] = field(["demo_facts"], "lm-eval task names: registry names or tasks defined in task_dir.")
    task_dir: InputDir | None = field(None, "Folder of lm-eval task YAMLs; their data files are hashed into the key.")
    num_fewshot: int = field(0, "Few-shot examples per item, the same for base and tuned.", ge=0)
    apply_chat_template: bool = field(True, "Render prompts with the model's chat template (base and tuned alike).")
    batch_size: int = field(16, "lm-eval batch size.", ge=1)
    limit: int | None = field(None, "Evaluate only the first N items of each task (None: all).", ge=1)
    seed: int = field(1234, "Seed passed to lm-eval (python, numpy, torch and few-shot sampling).")


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without running their `!function` tags."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def local_tasks(task_dir: Path | None) -> dict[str, tuple[Path, dict]]:
    """Task name -> (YAML file, parsed YAML) for every task YAML under task_dir."""
    found: dict[str, tuple[Path, dict]] = {}
    if task_dir is None:
        return found
    for path in sorted(task_dir.rglob("*.yaml")):
        doc = yaml.load(path.read_text(), Loader=_TaskYamlLoader) or {}
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            found[doc["task"]] = (path, doc)
    return found


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


def check_tasks(ec: EvaluateConfig) -> list[str]:
    """Problems with the configured tasks, found without loading any model."""
    problems, local = [], local_tasks(ec.task_dir)
    unknown = [t for t in ec.tasks if t not in local]
    for name, (path, doc) in local.items():
        if name in ec.tasks:
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


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    ec = cfg.evaluate
    files = {}
    for name, (path, doc) in local_tasks(ec.task_dir).items():
        if name in ec.tasks:
            files[name] = [sha256_file(f) for f in data_files(path, doc) if f.is_file()]
    payload = {"evaluate": key_payload(ec), "data_files": files, "student": fingerprint(cfg.student)}
    return stage_key(STAGE, VERSION, payload, upstream)


def portable_task_dir(ec: EvaluateConfig, into: Path) -> Path | None:
    """A copy of task_dir whose task YAMLs name their data files by absolute path."""
    if ec.task_dir is None:
        return None
    shutil.copytree(ec.task_dir, into, dirs_exist_ok=True)
    for path, doc in local_tasks(ec.task_dir).values():
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
        (into / path.relative_to(ec.task_dir)).write_text("\n".join(out) + "\n")
    return into


def lm_eval_args(cfg: PipelineConfig, adapter: Path | None, task_dir: Path | None) -> dict:
    """The simple_evaluate arguments: everything but `peft` identical for base and tuned."""
    import torch

    ec = cfg.evaluate
    model_args: dict = {"pretrained": resolve(cfg.student), "dtype": "auto" if torch.cuda.is_available() else "float32"}
    if adapter is not None:
        model_args["peft"] = str(adapter)
    return {
        "model": "hf",
        "model_args": model_args,
        "tasks": list(ec.tasks),
        "num_fewshot": ec.num_fewshot,
        "batch_size": ec.batch_size,
        "limit": ec.limit,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "apply_chat_template": ec.apply_chat_template,
        "random_seed": ec.seed,
        "numpy_random_seed": ec.seed,
        "torch_random_seed": ec.seed,
        "fewshot_random_seed": ec.seed,
        "log_samples": True,
    }


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, filter suffixes (`,none`) removed."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if "," in name and isinstance(value, (int, float)):
                metric, _filter = name.split(",", 1)
                out.setdefault(task, {})[metric] = float(value)
    return out


def _evaluate(cfg: PipelineConfig, staging: Staging, adapter: Path | None) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="synthtune-tasks-") as tmp:
        task_dir = portable_task_dir(cfg.evaluate, Path(tmp) / "tasks")
        # include_defaults=False skips indexing lm-eval's ~10k bundled YAMLs (~12 s) when all are local
        local = set(local_tasks(cfg.evaluate.task_dir))
        manager = TaskManager(include_path=str(task_dir) if task_dir else None,
                              include_defaults=not set(cfg.evaluate.tasks) <= local)
        args = lm_eval_args(cfg, adapter, task_dir)
        results = simple_evaluate(task_manager=manager, **args)
    samples = results.pop("samples", {})
    for task, rows in samples.items():
        with open(staging.path / f"samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    (staging.path / "results.json").write_text(json.dumps(results, indent=2, default=str))
    args["model_args"]["pretrained"] = cfg.student  # record the spec, not a machine-local path
    (staging.path / "lm_eval_args.json").write_text(json.dumps(args, indent=2, default=str))
    staging.metrics.update(scores=scores(results), model="tuned" if adapter else "base",
                           lm_eval_version=results.get("lm_eval_version"), task_versions=results.get("versions", {}))


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """Evaluate the base student (no upstream) or the adapter of `upstream['train']`."""
    train = (upstream or {}).get("train")

    def build(staging: Staging) -> None:
        if train is None:
            _evaluate(cfg, staging, None)
        else:
            with store.local_copy(train) as folder:
                _evaluate(cfg, staging, folder / "adapter")

    ups = {"train": train.key} if train else {}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(cfg.evaluate), build)
