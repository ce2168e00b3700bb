"""evaluate: lm-evaluation-harness on the base student and on the tuned adapter, identical flags.

Tasks are lm-eval registry names or task YAMLs in `evaluate.task_dir`. lm-eval resolves a YAML's
`data_files` against the working directory, so the YAMLs are copied to a temporary folder with
those paths made absolute (relative to the YAML). The base run's key has no adapter in it, so
base scores are reused across nights; the tuned run's key adds the train key.

Run as: synthtune evaluate configs/demo.yaml
"""

from __future__ import annotations

import contextlib
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
VERSION = "2"
IN_DOMAIN = "in_domain"
IN_DOMAIN_YAML = """\
# built by synthtune from the rows the filter held out
task: in_domain
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


class EvaluateConfig(Section):
    tasks: list[str] = field(["demo_facts"], "lm-eval task names: registry names or tasks defined in task_dir.")
    task_dir: InputDir | None = field(None, "Folder of lm-eval task YAMLs; their data files are hashed into the key.")
    num_fewshot: int = field(0, "Few-shot examples per item, the same for base and tuned.", ge=0)
    apply_chat_template: bool = field(True, "Render prompts with the model's chat template (base and tuned alike).")
    fewshot_as_multiturn: bool = field(True, "With a chat template, give few-shot examples as earlier turns.")
    system_instruction: str | None = field(None, "System instruction put in front of every prompt (base and tuned).")
    in_domain: bool = field(
        False, f"Also run `{IN_DOMAIN}`, built from the rows the filter held out (filter.holdout): the teacher's reply "
        "scored by log-likelihood (acc: the student's greedy reply is the teacher's; perplexity).")
    batch_size: int = field(16, "lm-eval batch size.", ge=1)
    limit: int | None = field(None, "Evaluate only the first N items of each task (None: all).", ge=1)
    seed: int = field(1234, "Seed passed to lm-eval (python, numpy, torch and few-shot sampling).")


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


def check_tasks(ec: EvaluateConfig) -> list[str]:
    """Problems with the configured tasks, found without loading any model."""
    local, problems = scan_task_dir(ec.task_dir)
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
    if not ec.in_domain:  # base scores stay cached across nights unless they depend on the data
        upstream = {k: v for k, v in upstream.items() if k != "filter"}
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
        "fewshot_as_multiturn": ec.fewshot_as_multiturn and ec.apply_chat_template,
        "system_instruction": ec.system_instruction,
        "random_seed": ec.seed,
        "numpy_random_seed": ec.seed,
        "torch_random_seed": ec.seed,
        "fewshot_random_seed": ec.seed,
        "log_samples": True,
    }


def cli_command(args: dict, include_path: str | None, output_path: str) -> list[str]:
    """The `lm_eval` CLI call equivalent to `simple_evaluate(**args)`: same model, tasks and flags.
    Used by the parity test and the benchmark, so 'the harness itself' is never hand-typed."""
    cmd = ["lm_eval", "run", "--model", args["model"],
           "--model_args", ",".join(f"{k}={v}" for k, v in args["model_args"].items()),
           "--tasks", ",".join(args["tasks"]), "--num_fewshot", str(args["num_fewshot"]),
           "--batch_size", str(args["batch_size"]), "--device", args["device"],
           "--seed", ",".join(str(args[k]) for k in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                                     "fewshot_random_seed")),
           "--output_path", output_path, "--fewshot_as_multiturn", str(args["fewshot_as_multiturn"]).lower()]
    if args["limit"] is not None:
        cmd += ["--limit", str(args["limit"])]
    if args["apply_chat_template"]:
        cmd.append("--apply_chat_template")
    if args["system_instruction"]:
        cmd += ["--system_instruction", args["system_instruction"]]
    if args["log_samples"]:
        cmd.append("--log_samples")
    if include_path:
        cmd += ["--include_path", include_path]
    return cmd


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results. The default filter (`,none`) is dropped from
    the name; other filters stay in brackets, e.g. `exact_match[strict-match]`, so they never collide."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if "," in name and isinstance(value, (int, float)):
                metric, filt = name.split(",", 1)
                if filt != "none":
                    base, _, stderr = metric.partition("_stderr")
                    metric = f"{base}[{filt}]" + ("_stderr" if _ else "")
                out.setdefault(task, {})[metric] = float(value)
    return out


def in_domain_task(heldout: Path, into: Path) -> None:
    """Write the in-domain task (YAML + JSONL of held-out prompt/response pairs) into `into`."""
    import pandas as pd

    rows = pd.read_parquet(heldout)
    if rows.empty:
        raise ValueError("evaluate.in_domain needs held-out rows: set filter.holdout > 0")
    into.mkdir(parents=True, exist_ok=True)
    rows[["id", "prompt", "response"]].to_json(into / "in_domain.jsonl", orient="records", lines=True)
    (into / "in_domain.yaml").write_text(IN_DOMAIN_YAML.format(data=into / "in_domain.jsonl"))


def _evaluate(cfg: PipelineConfig, staging: Staging, adapter: Path | None, heldout: Path | None,
              adapter_key: str | None = None) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="synthtune-tasks-") as tmp:
        task_dir = portable_task_dir(cfg.evaluate, Path(tmp) / "tasks") or Path(tmp) / "tasks"
        if heldout is not None:
            in_domain_task(heldout, task_dir / "synthtune_in_domain")
        # include_defaults=False skips indexing lm-eval's ~10k bundled YAMLs (~12 s) when all are local
        local = set(local_tasks(cfg.evaluate.task_dir))
        manager = TaskManager(include_path=str(task_dir) if task_dir.exists() else None,
                              include_defaults=not set(cfg.evaluate.tasks) <= local)
        args = lm_eval_args(cfg, adapter, task_dir)
        if heldout is not None:
            args["tasks"].append(IN_DOMAIN)
        results = simple_evaluate(task_manager=manager, **args)
    samples = results.pop("samples", {})
    for task, rows in samples.items():
        with open(staging.path / f"samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    (staging.path / "results.json").write_text(json.dumps(results, indent=2, default=str))
    args["model_args"]["pretrained"] = cfg.student  # record identities, not machine-local paths
    if adapter is not None:
        args["model_args"]["peft"] = f"train/{adapter_key}/adapter"
    (staging.path / "lm_eval_args.json").write_text(json.dumps(args, indent=2, default=str))
    staging.metrics.update(scores=scores(results), model="tuned" if adapter else "base", adapter_key=adapter_key,
                           student=cfg.student, lm_eval_version=results.get("lm_eval_version"),
                           task_versions=results.get("versions", {}))


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """Evaluate the base student (no `train` upstream) or the adapter of `upstream['train']`; with
    evaluate.in_domain, on the rows `upstream['filter']` held out too."""
    upstream = upstream or {}
    train = upstream.get("train")
    source = upstream.get("filter") if cfg.evaluate.in_domain else None
    if cfg.evaluate.in_domain and source is None:
        raise ValueError("evaluate.in_domain needs the filter output (upstream 'filter')")

    def build(staging: Staging) -> None:
        with contextlib.ExitStack() as stack:
            adapter = stack.enter_context(store.local_copy(train)) / "adapter" if train else None
            heldout = stack.enter_context(store.local_copy(source)) / "heldout.parquet" if source else None
            _evaluate(cfg, staging, adapter, heldout, train.key if train else None)

    ups = {name: ref.key for name, ref in upstream.items() if name == "train" or (name == "filter" and source)}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(cfg.evaluate), build)
