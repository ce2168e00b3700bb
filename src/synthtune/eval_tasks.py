"""lm-eval task YAMLs on disk: find them, check them, read their data, make them portable.

Shared by the stages that read eval tasks (preflight checks them, filter decontaminates against
their items, evaluate runs them), so no stage imports another for it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from synthtune.digests import file_sha256
from synthtune.keys import key_payload

if TYPE_CHECKING:
    from synthtune.configs import EvaluateConfig, PipelineConfig


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


def data_files(path: Path, doc: dict, split: str | None = None) -> list[Path]:
    """Local data files a task YAML names, resolved against the YAML's folder: all of them, or those of
    `split` where it names files per split."""
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if split is not None and isinstance(files, dict) and split in files:
        files = files[split]
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
    """The items of a local task data file: JSON lines (or one JSON array), CSV or Parquet. Raises
    ValueError naming the file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".csv", ".tsv"):
        import csv

        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{e.object[e.start]:02x})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{path}: item {bad} of the JSON array is not an object")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
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


# lm-eval's metrics for a task without a metric_list (lm_eval.api.registry.DEFAULT_METRIC_REGISTRY;
# a test keeps the two equal). A task without output_type generates.
DEFAULT_METRICS = {
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
}
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "doc_to_decontamination_query")


def task_metrics(cfg: dict) -> set[str]:
    """The metric names a task (or a group's aggregate) reports, as synthtune names them:
    `acc`, or `exact_match[strict-match]` under a filter other than lm-eval's default `none`."""
    if "aggregate_metric_list" in cfg or "group" in cfg and "output_type" not in cfg:
        return {m["metric"] for m in cfg.get("aggregate_metric_list") or [] if isinstance(m, dict) and "metric" in m}
    names = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    names = names or DEFAULT_METRICS.get(cfg.get("output_type") or "generate_until", [])
    filters = [f["name"] for f in cfg.get("filter_list") or [] if isinstance(f, dict) and f.get("name")] or ["none"]
    return {m if f == "none" else f"{m}[{f}]" for m in names for f in filters}


def template_fields(cfg: dict) -> tuple[dict[str, set[str]], list[str]]:
    """({template key: fields its Jinja template reads}, syntax problems) for a task's doc_to_* templates."""
    import jinja2
    import jinja2.meta

    env, fields, problems = jinja2.Environment(), {}, []
    for k in TEMPLATE_KEYS:
        value = cfg.get(k)
        if isinstance(value, str) and ("{{" in value or "{%" in value):
            try:
                fields[k] = jinja2.meta.find_undeclared_variables(env.parse(value))
            except jinja2.TemplateSyntaxError as e:
                problems.append(f"{k}: not a valid Jinja template ({e.message})")
    return fields, problems


def check_data(name: str, path: Path, cfg: dict) -> list[str]:
    """A local task's data files: each must exist and parse, and every row must have the fields
    its templates read (unless `process_docs` builds them)."""
    problems = []
    fields, syntax = template_fields(cfg)
    problems += [f"evaluate task '{name}' ({path}): {p}" for p in syntax]
    for file in data_files(path, cfg):
        if not file.is_file():
            problems.append(f"evaluate task '{name}' ({path}): data file not found: {file}")
            continue
        try:
            rows = read_task_rows(file)
        except ValueError as e:
            problems.append(f"evaluate task '{name}': {e}")
            continue
        if not rows:
            problems.append(f"evaluate task '{name}' ({path}): {file} has no items; lm-eval would fail after training")
            continue
        if "process_docs" in cfg:
            continue
        problems += [f"evaluate task '{name}' ({path}): {p}" for p in label_problems(cfg, rows, file)]
        for key, used in fields.items():
            lacking = [(i, sorted(used - set(row))) for i, row in enumerate(rows, 1) if used - set(row)]
            if lacking:
                line, missing = lacking[0]
                more = f" (and {len(lacking) - 1} more rows)" if len(lacking) > 1 else ""
                problems.append(f"evaluate task '{name}' ({path}): {key} reads "
                                + ", ".join("{{" + m + "}}" for m in missing)
                                + f", which {file}:{line} lacks{more}")
    return problems


def _field_ref(value) -> str | None:
    """The row field a `doc_to_*` setting names as such: `label` or `{{label}}`, else None."""
    import re

    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*(?:\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}|([A-Za-z_][A-Za-z0-9_]*))\s*", value)
    return (m.group(1) or m.group(2)) if m else None


def label_problems(cfg: dict, rows: list[dict], file: Path, most: int = 3) -> list[str]:
    """Multiple choice: a row whose target index is not one of its choices (lm-eval would fail or
    score it wrong after training), named by file:line."""
    if cfg.get("output_type") != "multiple_choice":
        return []
    target, choice = _field_ref(cfg.get("doc_to_target")), cfg.get("doc_to_choice")
    fixed = choice if isinstance(choice, list) else None
    choice_field = None if fixed is not None else _field_ref(choice)
    if target is None or (fixed is None and choice_field is None):
        return []
    out = []
    for line, row in enumerate(rows, 1):
        label = row.get(target)
        choices = fixed if fixed is not None else row.get(choice_field)
        if isinstance(label, bool) or not isinstance(label, int) or not isinstance(choices, list):
            continue
        if not 0 <= label < len(choices):
            out.append(f"{file}:{line}: {target} {label} is out of range for its {len(choices)} choices "
                       f"(0..{len(choices) - 1})")
    return out[:most] + ([f"... and {len(out) - most} more rows"] if len(out) > most else [])


def hub_dataset_cached(dataset: str) -> bool:
    """Whether a Hub dataset is in the local caches (the Hub's or datasets' own)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    hub = Path(HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(HF_HUB_CACHE).parent / "datasets")
    return hub.is_dir() or any(datasets_cache.glob(dataset.replace("/", "___") + "*"))


def check_tasks(tasks: list[str], task_dir: Path | None, metric: str | None = None,
                scored: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Problems with the configured tasks, found without loading any model: broken or duplicate task
    YAMLs, unknown tasks, data files missing, malformed or lacking a field a template reads, and a
    `metric` that a task in `scored` does not report."""
    local, problems = scan_task_dir(task_dir)
    cfgs = _cfgs(task_dir) if local else {}
    for name, (path, _) in local.items():
        if name in tasks:
            problems += check_data(name, path, cfgs[name])
    unknown = [t for t in tasks if t not in local]
    registry = _registry() if unknown else {}
    for name in unknown:
        if name not in registry:
            import difflib

            close = difflib.get_close_matches(name, sorted(set(registry) | set(local)), n=3)
            problems.append(f"evaluate.tasks: unknown task '{name}'" + (f"; did you mean {close}?" if close else ""))
    if metric:
        for name in scored:
            cfg = cfgs.get(name) if name in local else registry.get(name)
            reported = task_metrics(cfg) if cfg else set()
            if cfg and reported and metric not in reported:
                problems.append(f"promote.metric '{metric}': task '{name}' reports {sorted(reported)}, not "
                                f"'{metric}'; the gate would find nothing to compare")
    return problems


def offline_warnings(tasks: list[str], task_dir: Path | None) -> list[str]:
    """Registry tasks whose Hub dataset is not cached while HF_DATASETS_OFFLINE is set (evaluate
    would fail after training)."""
    if os.environ.get("HF_DATASETS_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return []
    remote = [t for t in tasks if t not in local_tasks(task_dir)]
    if not remote:
        return []
    registry, out = _registry(), []
    for name in remote:
        dataset = (registry.get(name) or {}).get("dataset_path")
        if isinstance(dataset, str) and dataset not in ("json", "csv", "parquet", "text") \
                and not hub_dataset_cached(dataset):
            out.append(f"evaluate task '{name}' reads the Hub dataset '{dataset}', which is not in the local cache, "
                       "and HF_DATASETS_OFFLINE is set: evaluate will fail. Download it first, or unset it.")
    return out


def _cfgs(task_dir: Path | None) -> dict[str, dict]:
    """Local tasks as lm-eval reads them (`include:` merged in)."""
    if task_dir is None:
        return {}
    from lm_eval.tasks import TaskManager

    return {name: dict(entry.cfg) for name, entry in
            TaskManager(include_path=str(task_dir), include_defaults=False).task_index.items() if entry.cfg}


@functools.cache
def _registry() -> dict[str, dict]:
    """lm-eval's own tasks and groups: name -> config (includes merged). Indexed once per process
    (it takes seconds); callers only read it."""
    from lm_eval.tasks import TaskManager

    return {name: dict(entry.cfg or {}) for name, entry in TaskManager().task_index.items()}


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


def task_data(ec: EvaluateConfig) -> dict[str, list[str]]:
    """The sha256 of each local eval task's data files."""
    return {name: [file_sha256(f) for f in data_files(path, doc) if f.is_file()]
            for name, (path, doc) in local_tasks(ec.task_dir).items() if name in ec.tasks}


def chat_payload(cfg: PipelineConfig) -> dict | None:
    """What decides the template lm-eval renders with (synthtune.parity): the template file and its
    variables. The student's own template is in its fingerprint."""
    if not cfg.evaluate.apply_chat_template:
        return None
    tp = key_payload(cfg.template)
    return {k: tp.get(k) for k in ("chat_template", "chat_template_kwargs", "date_string")}


FORGETTING_YAML = """\
# built by synthtune from evaluate.forgetting: the general-text sample, scored as plain text
task: forgetting
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def in_domain_task(rows, into: Path, delimiter: str = "", slices: dict[str, str] | None = None) -> None:
    """Write the in-domain task (YAML + JSONL of held-out prompt/response rows, a DataFrame) into `into`.
    Each reply starts with `delimiter`, what the chat template puts between the prompt and a reply
    (lm-eval's loglikelihood requests ignore target_delimiter): it is scored as it was trained. Each
    item's `slice` is its seed's value in `slices` (seed id -> value), else its seed file."""
    import pandas as pd

    into.mkdir(parents=True, exist_ok=True)
    files = rows["seed_file"] if "seed_file" in rows else pd.Series([None] * len(rows), index=rows.index)
    label = [slices.get(str(i)) if slices is not None else f for i, f in zip(rows["id"], files, strict=True)]
    rows = rows[["id", "prompt", "response"]].assign(response=delimiter + rows["response"], slice=label)
    rows.to_json(into / "in_domain.jsonl", orient="records", lines=True)
    (into / "in_domain.yaml").write_text(IN_DOMAIN_YAML.format(data=into / "in_domain.jsonl"))


def paragraphs(sample: Path) -> list[str]:
    """The paragraphs of a general-text sample: blank-line separated, '#' lines skipped."""
    lines = [line for line in Path(sample).read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    return [p.strip() for p in "\n".join(lines).split("\n\n") if p.strip()]


def forgetting_task(sample: Path, into: Path) -> list[str]:
    """Write the forgetting task (YAML + JSONL of the sample's paragraphs) into `into`; its paragraphs."""
    texts = paragraphs(sample)
    if not texts:
        raise ValueError(f"evaluate.forgetting: {sample} holds no text")
    into.mkdir(parents=True, exist_ok=True)
    (into / "forgetting.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (into / "forgetting.yaml").write_text(FORGETTING_YAML.format(data=into / "forgetting.jsonl"))
    return texts


def task_requests(ec: EvaluateConfig) -> tuple[int, list[str]]:
    """What lm-eval will score per model, counted from the tasks' own data: (requests, the tasks it
    cannot count here). A local task's items are its test split's rows (capped at evaluate.limit), each a
    request, or one per choice for multiple choice; the forgetting sample is a request per paragraph
    (one the model's context cannot hold is scored in several windows).
    Registry tasks and groups (data not local) and the in-domain task (its rows exist after filter)
    are named instead."""
    local = local_tasks(ec.task_dir)
    requests, unknown = 0, []
    for name in ec.tasks:
        if name not in local or "include" in local[name][1]:
            unknown.append(name)
            continue
        path, doc = local[name]
        try:
            rows = [row for f in data_files(path, doc, doc.get("test_split")) for row in read_task_rows(f)][:ec.limit]
        except (OSError, ValueError):  # unreadable data is check_data's to report
            unknown.append(name)
            continue
        choices = doc.get("doc_to_choice")
        if doc.get("output_type") == "multiple_choice" and isinstance(choices, list):
            requests += len(rows) * len(choices)
        elif doc.get("output_type") == "multiple_choice" and (ref := _field_ref(choices)):
            requests += sum(len(row.get(ref) or ()) for row in rows)
        elif doc.get("output_type") == "multiple_choice":
            unknown.append(name)
        else:
            requests += len(rows)
    if ec.forgetting is not None:
        requests += len(paragraphs(ec.forgetting))
    if ec.in_domain:
        unknown.append("in_domain")  # synthtune.configs.IN_DOMAIN
    return requests, unknown


def backend_problems(ec: EvaluateConfig) -> list[str]:
    """The evaluate backend cannot run here: vLLM not installed (checked by preflight, before any GPU time,
    and by evaluate itself)."""
    import importlib.util

    if ec.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        return ["evaluate.backend: vllm needs vLLM, which is not installed here: `pip install 'synthtune[vllm]'` on "
                "a CUDA machine, or evaluate.backend: hf"]
    return []
