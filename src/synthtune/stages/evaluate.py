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
import os
import resource
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from synthtune import parity
from synthtune.child import ranks_command, run_group
from synthtune.configs import FORGETTING, IN_DOMAIN, EvaluateConfig
from synthtune.eval_tasks import (
    backend_problems,
    chat_payload,
    forgetting_task,
    in_domain_task,
    local_tasks,
    portable_task_dir,
    task_data,
)
from synthtune.keys import key_payload, stage_key
from synthtune.models import fingerprint, load_tokenizer, resolve, revision_kw
from synthtune.seeds import field_values
from synthtune.store import ArtifactRef, ArtifactStore, Staging, produce
from synthtune.versions import stage_libs

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

__all__ = ["IN_DOMAIN", "EvaluateConfig", "key", "run"]

STAGE = "evaluate"
VERSION = "2"
CHILD = "synthtune.stages._evaluate_ranks"  # one rank of a data-parallel evaluation


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """The evaluation settings, the task YAMLs' data, lm-eval and transformers major.minor, the student,
    the device and dtype, and the digests of the adapter's train output (`upstream['train']`; none for
    the base model) and, with evaluate.in_domain, of the filter output that holds the in-domain rows."""
    ec = cfg.evaluate
    settings = key_payload(ec)
    if ec.backend == "hf":  # the backend every key before it had: those outputs keep their keys
        settings.pop("backend")
    payload = {"evaluate": settings, "data_files": task_data(ec), "chat": chat_payload(cfg), "libs": stage_libs(STAGE),
               "student": fingerprint(cfg.student, cfg.student_revision), "runtime": eval_runtime()}
    if not ec.in_domain:  # base scores stay cached across nights unless they depend on the data
        upstream = {k: v for k, v in upstream.items() if k != "filter"}
    return stage_key(STAGE, VERSION, payload, upstream)


def eval_runtime() -> dict[str, str]:
    """What changes lm-eval's numbers on this hardware: the device kind and the dtype it loads in
    (both in the evaluate key, so a CPU box's scores are never served to a GPU box as cached)."""
    import torch

    cuda = torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu", "dtype": "auto" if cuda else "float32"}


ADAPTER_ARG = {"hf": "peft", "vllm": "lora_local_path"}  # lm-eval's model argument naming the adapter, by backend


def lm_eval_args(cfg: PipelineConfig, adapter: Path | None, task_dir: Path | None, tokenizer=None) -> dict:
    """The simple_evaluate arguments: everything but `peft` identical for base and tuned."""

    ec = cfg.evaluate
    runtime = eval_runtime()
    model_args: dict = {"pretrained": resolve(cfg.student), "dtype": runtime["dtype"], **revision_kw(cfg.student_revision)}
    if ec.apply_chat_template and (chat := parity.chat_template_args(cfg, tokenizer or _tokenizer(cfg))):
        model_args["chat_template_args"] = chat  # the template training rendered with, its variables pinned
    if adapter is not None:
        model_args[ADAPTER_ARG[ec.backend]] = str(adapter)
    if ec.backend == "vllm":  # the adapter served as a LoRA of the base, as a vLLM server would serve it
        model_args = {**model_args, "enable_lora": adapter is not None, "max_lora_rank": max(16, cfg.train.lora.r)}
        if ec.num_processes > 1:
            model_args["data_parallel_size"] = ec.num_processes
    return {
        "model": ec.backend,
        "model_args": model_args,
        "tasks": list(ec.tasks),
        "num_fewshot": ec.num_fewshot,
        "batch_size": ec.batch_size,
        "limit": ec.limit,
        "device": runtime["device"],
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
    if "chat_template_args" in args["model_args"]:
        raise ValueError("the lm_eval CLI's --model_args cannot carry chat_template_args")
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


def own_tasks(cfg: PipelineConfig, task_dir: Path, heldout: Path | None, tokenizer=None) -> list[str]:
    """Write synthtune's own tasks into `task_dir` (the in-domain task from the held-out rows, the
    forgetting sample) and return their names: what `evaluate` adds to evaluate.tasks."""
    import pandas as pd

    names = []
    if heldout is not None:
        rows = pd.read_parquet(heldout)
        if rows.empty:
            raise ValueError("evaluate.in_domain found no held-out rows: raise filter.holdout_fraction")
        field_ = cfg.evaluate.slice_field
        in_domain_task(rows, task_dir / "synthtune_in_domain", in_domain_delimiter(cfg, tokenizer),
                       field_values(cfg.generate.seeds, field_) if field_ and cfg.generate.seeds else None)
        names.append(IN_DOMAIN)
    if cfg.evaluate.forgetting is not None:
        forgetting_task(cfg.evaluate.forgetting, task_dir / "synthtune_forgetting")
        names.append(FORGETTING)
    return names


def _tokenizer(cfg: PipelineConfig):
    return load_tokenizer(cfg.student, cfg.student_revision)


def token_loss(tokenizer, rows: list[dict]) -> float:
    """Mean loss per token of the general-text sample: minus the rolling log-likelihoods summed over its
    paragraphs, over their token count (the student's tokenizer, the same for base and adapters)."""
    total, tokens = 0.0, 0
    for row in rows:
        ll = row["filtered_resps"]
        while isinstance(ll, (list, tuple)):
            ll = ll[0]
        total += float(ll)
        tokens += len(tokenizer(row["doc"]["text"], add_special_tokens=False)["input_ids"])
    return round(-total / max(tokens, 1), 6)


def in_domain_delimiter(cfg: PipelineConfig, tokenizer=None) -> str:
    """The in-domain reply is scored after what the template puts before a reply, as it was trained."""
    if not cfg.evaluate.apply_chat_template:
        return ""
    enc = parity.encoder(cfg, tokenizer or _tokenizer(cfg))
    return parity.reply_delimiter(enc, parity.eval_template(enc)) or ""


class _Requests:
    """Stands in for lm-eval's tqdm in its HF model: counts the scored requests as `evaluate` progress
    events (the terminal's bar) and prints nothing (its own bars are noise on a log or a pipe)."""

    def __init__(self, iterable=None, total=None, **_):
        self.iterable, self.total, self.n, self._last = iterable, total, 0, 0.0
        if self.total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        import time

        from synthtune import progress

        self.n += n
        if time.monotonic() - self._last > 0.2 or self.n == self.total:
            self._last = time.monotonic()
            # a bar built with a total (not over an iterable) counts the model's inputs: contexts, windows
            progress.emit("evaluate", done=self.n, total=self.total, bar=id(self), inputs=self.iterable is None)

    def close(self) -> None:
        pass

    def set_description(self, *_, **__) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def harness(cfg: PipelineConfig, adapter: Path | None, heldout: Path | None,
            tokenizer=None) -> tuple[dict | None, dict, dict]:
    """lm-eval's results (samples included), the simple_evaluate arguments, and this process's share
    (rank, world_size, the requests it scored, its peak memory), in this process. Under torch's launcher
    (evaluate.num_processes) this process is one rank: it scores its share of every task, and the
    results are rank 0's alone (None on the others)."""
    import lm_eval.models.huggingface
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from synthtune import progress

    bars: dict[int, int] = {}  # lm-eval's progress bars (one per request type): the inputs it scored

    def count(event: dict) -> None:
        if event["kind"] == STAGE and event.get("inputs"):
            bars[event["bar"]] = event["done"]

    tokenizer = tokenizer or _tokenizer(cfg)
    with tempfile.TemporaryDirectory(prefix=f"synthtune-tasks-{os.getpid()}-") as tmp:
        task_dir = portable_task_dir(cfg.evaluate.task_dir, Path(tmp) / "tasks") or Path(tmp) / "tasks"
        own = own_tasks(cfg, task_dir, heldout, tokenizer)
        # include_defaults=False skips indexing lm-eval's ~10k bundled YAMLs (~12 s) when all are local
        local = set(local_tasks(cfg.evaluate.task_dir))
        manager = TaskManager(include_path=str(task_dir) if task_dir.exists() else None,
                              include_defaults=not set(cfg.evaluate.tasks) <= local)
        args = lm_eval_args(cfg, adapter, task_dir, tokenizer)
        args["tasks"] += own
        model = _rank_model(args) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else args["model"]
        own_bars, lm_eval.models.huggingface.tqdm = lm_eval.models.huggingface.tqdm, _Requests
        try:
            with progress.listen(count):
                results = simple_evaluate(task_manager=manager, **{**args, "model": model})
        finally:
            lm_eval.models.huggingface.tqdm = own_bars
    # peak memory of this process (with one process, the stage's own); ru_maxrss is in KiB on Linux
    share = {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
             "requests": sum(bars.values()),
             "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    return results, args, share


def _rank_model(args: dict):
    """lm-eval's HF model as one rank of a data-parallel evaluation. lm-eval splits the requests between
    the ranks accelerate knows only when it counts several CUDA devices; on a CPU (gloo) it would score
    everything on every rank, so the ranks are made explicit, exactly as lm-eval sets them on GPUs."""
    from lm_eval.api.registry import get_model

    lm = get_model(args["model"]).create_from_arg_obj(
        args["model_args"], {"batch_size": args["batch_size"], "device": args["device"]})
    accelerator = getattr(lm, "accelerator", None)
    if lm.world_size == 1 and accelerator is not None and accelerator.num_processes > 1:
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    return lm


def launch_command(spec: Path, num_processes: int, device: str) -> list[str]:
    """The ranks' command: `accelerate launch` across GPUs (lm-eval's own data-parallel recipe) or, on a
    CPU, torch's launcher with one gloo rank per process."""
    return ranks_command(CHILD, spec, num_processes, device, ["--multi_gpu", "--num_processes", str(num_processes)])


def _harness_ranks(cfg: PipelineConfig, adapter: Path | None, heldout: Path | None) -> tuple[dict, dict, list[dict]]:
    """harness() on evaluate.num_processes ranks (a process group of their own, killed with the stage):
    each scores its share and writes it down, rank 0 gathers the results and writes them for this process."""
    n = cfg.evaluate.num_processes
    with tempfile.TemporaryDirectory(prefix="synthtune-eval-ranks-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"cfg": cfg.model_dump(mode="json"), "out": tmp,
                                    "adapter": str(adapter) if adapter else None,
                                    "heldout": str(heldout) if heldout else None}))
        rc = run_group(launch_command(spec, n, eval_runtime()["device"]), Path(tmp) / "progress.jsonl", STAGE)
        done = Path(tmp) / "results.json"
        if rc != 0 or not done.exists():
            how = f"stopped by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            raise RuntimeError(f"evaluate.num_processes={n}: the evaluation ranks failed ({how}); "
                               "their output is in the run's log")
        found = json.loads(done.read_text())
        shares = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]
    return found["results"], found["args"], sorted(shares, key=lambda r: r["rank"])


def _evaluate(cfg: PipelineConfig, staging: Staging, adapter: Path | None, heldout: Path | None,
              adapter_key: str | None = None) -> None:
    if problems := backend_problems(cfg.evaluate):
        raise ValueError(problems[0])
    tokenizer = _tokenizer(cfg)  # loaded once: the template's arguments, the in-domain lead-in, the forgetting tokens
    if cfg.evaluate.num_processes > 1 and cfg.evaluate.backend == "hf":
        results, args, ranks = _harness_ranks(cfg, adapter, heldout)
    else:
        results, args, share = harness(cfg, adapter, heldout, tokenizer)
        ranks = [share]
    samples = {task: sorted(rows, key=lambda r: r["doc_id"])  # ranks gather in rank order; one order for all
               for task, rows in results.pop("samples", {}).items()}
    for task, rows in samples.items():
        with open(staging.path / f"samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    (staging.path / "results.json").write_text(json.dumps(results, indent=2, default=str))
    args["model_args"]["pretrained"] = cfg.student  # record identities, not machine-local paths
    if adapter is not None:
        args["model_args"][ADAPTER_ARG[cfg.evaluate.backend]] = f"train/{adapter_key}/adapter"
    (staging.path / "lm_eval_args.json").write_text(json.dumps(args, indent=2, default=str))
    found = scores(results)
    if FORGETTING in samples:
        found.setdefault(FORGETTING, {})["loss"] = token_loss(tokenizer, samples[FORGETTING])
    staging.metrics.update(scores=found, model="tuned" if adapter else "base", adapter_key=adapter_key,
                           backend=cfg.evaluate.backend, ranks=ranks,
                           student=cfg.student, lm_eval_version=results.get("lm_eval_version"),
                           task_versions=results.get("versions", {}))


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None,
        output_key: str | None = None, rebuild: bool = False) -> ArtifactRef:
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

    used = {name: ref for name, ref in upstream.items() if name == "train" or (name == "filter" and source)}
    k = output_key or key(cfg, {name: ref.digest for name, ref in used.items()})
    return produce(store, STAGE, k, {name: ref.key for name, ref in used.items()}, key_payload(cfg.evaluate), build,
                   rebuild)
