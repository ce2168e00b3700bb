"""train: LoRA / QLoRA fine-tuning of the student with TRL + PEFT, SFT or DPO.

Consumes the template stage's tokenized rows untouched (SFT: `input_ids` + `assistant_masks`;
DPO: `prompt_ids` / `chosen_ids` / `rejected_ids`). QLoRA (bitsandbytes NF4, double quantization,
bf16 compute) whenever CUDA is present; full-precision LoRA on CPU, where the 4-bit path is an
option (`train.quantization=nf4`, with the `Linear4bit` avx512bf16 fix).

Before any GPU time: PEFT must find the target modules (checked on an empty-weight model), and the
disk needed by checkpoints, the adapter and a merged export must be free. Training then runs in a
child process in its own process group, which dies with its parent (no orphan holds the GPU).
Checkpoints land in a work folder that survives a crash; a retry resumes from the newest checkpoint
that validates, skipping half-written ones. A CUDA out-of-memory halves the micro-batch and doubles
gradient accumulation (same effective batch), at most three times.

Run as: synthtune train configs/demo.yaml
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from synthtune import budget, cards, lineage
from synthtune.child import ranks_command, run_group
from synthtune.configs import LoraParams, TrainConfig
from synthtune.keys import key_payload, stage_key
from synthtune.models import fingerprint, resolve, revision_kw
from synthtune.store import ArtifactRef, ArtifactStore, Staging, produce
from synthtune.versions import stage_libs

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

__all__ = ["LoraParams", "TrainConfig", "export_merged", "key", "run"]

STAGE = "train"
VERSION = "3"
OOM_EXIT = 3
SERVING_EXIT = 4  # the export would not serve what was trained: work/error.txt says why
BUDGET_EXIT = 5  # cost.max_gpu_hours stopped training at a checkpoint: work/over_budget.json says where
OOM_MARK = "out_of_memory.json"  # train.engine: ray: a worker ran out of CUDA memory (the driver exits OOM_EXIT)
MAX_OOM_RETRIES = 3
log = logging.getLogger("synthtune.train")

# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices report MFU as None.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@dataclass(frozen=True)
class Runtime:
    """What the hardware-dependent settings (`quantization: auto`, `packing` and `liger` left empty, the
    attention kernel) resolve to on this machine. Resolved once in the parent: it is in the train key
    (a CPU box's fp32 LoRA and a GPU box's QLoRA never share a key), and the child trains with it."""

    device: str  # cuda | cpu
    quantization: str  # nf4 | none
    compute_dtype: str  # bfloat16 | float32
    packing: bool
    liger: bool
    attn_implementation: str | None  # None: transformers' default

    @property
    def four_bit(self) -> bool:
        return self.quantization == "nf4"


def has_module(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_runtime(tc: TrainConfig) -> Runtime:
    import torch

    cuda = torch.cuda.is_available()
    flash = cuda and has_module("flash_attn")
    packing = tc.mode == "sft" and (tc.packing if tc.packing is not None else flash)  # no cross-row attention
    return Runtime(
        device="cuda" if cuda else "cpu",
        quantization="nf4" if tc.quantization == "nf4" or (tc.quantization == "auto" and cuda) else "none",
        compute_dtype="bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32",
        packing=packing,
        liger=tc.liger if tc.liger is not None else (cuda and has_module("liger_kernel")),
        attn_implementation="flash_attention_2" if packing and flash else None,
    )


LINEAGE_FIELDS = ("init", "data", "replay", "rebase_every", "continue_learning_rate", "continue_epochs")
CONTINUED_FIELDS = ("data", "replay", "continue_learning_rate", "continue_epochs")  # in a continued night's key


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """The train settings (quantization, packing and liger by what they resolve to on this machine),
    the student, trl/peft/transformers/bitsandbytes major.minor, and the templated rows' digest
    (max_length is the template stage's, in that digest). `train.merge` is not in it: the merged
    export is added to a finished adapter without retraining (`export_merged`).

    A continued night has a `parent` upstream (the adapter it starts from, by digest: a rollback
    changes it), and `data`, `replay` and its own schedule (`continue_*`) in its key. A night from
    base has neither: those fields, `init` and `rebase_every` change nothing it trains, so it shares
    its key with a plain night."""
    settings = key_payload(cfg.train)
    policy = {f: settings.pop(f) for f in LINEAGE_FIELDS}
    if "parent" in upstream:
        settings["lineage"] = {f: policy[f] for f in CONTINUED_FIELDS}
    payload = {"train": settings, "libs": stage_libs(STAGE), "student": fingerprint(cfg.student, cfg.student_revision),
               "runtime": asdict(resolve_runtime(cfg.train))}
    return stage_key(STAGE, VERSION, payload, upstream)


# ---------------------------------------------------------------- model pieces


def lora_config(tc: TrainConfig):
    from peft import LoraConfig

    lc = tc.lora
    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        use_dora=lc.use_dora, use_rslora=lc.use_rslora, bias="none", task_type="CAUSAL_LM",
    )


def load_student(spec: str, runtime: Runtime, four_bit: bool | None = None, revision: str | None = None):
    """The student ready for LoRA: NF4-quantized (QLoRA) or full precision, as `runtime` says
    (`four_bit=False` forces the full-precision base, e.g. to merge into)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = runtime.device == "cuda"
    compute = getattr(torch, runtime.compute_dtype)
    kwargs: dict = {"dtype": compute}
    if runtime.attn_implementation:
        kwargs["attn_implementation"] = runtime.attn_implementation
    if runtime.four_bit if four_bit is None else four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if cuda else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(resolve(spec), **revision_kw(revision), **kwargs)


def fix_cpu_4bit(model) -> int:
    """bitsandbytes' CPU 4-bit kernel with avx512bf16 computes wrong LoRA gradients after any
    eval-mode forward; the generic path is right. Returns how many layers were switched."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def param_counts(cfg: PipelineConfig) -> tuple[int, int]:
    """(base parameters, LoRA parameters) on an empty-weight model: no download of weights, and
    PEFT's own check that the target modules exist. Raises ValueError naming the modules."""
    return _shape(cfg)[:2]


def _shape(cfg: PipelineConfig) -> tuple[int, int, int, int]:
    """(base parameters, LoRA parameters, hidden size, layers) of the student, from its config."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve(cfg.student), **revision_kw(cfg.student_revision))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    try:
        peft_model = get_peft_model(model, lora_config(cfg.train))
    except ValueError as e:
        raise ValueError(f"train.lora.target_modules={cfg.train.lora.target_modules!r} on {cfg.student}: {e}") from None
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return total, lora, config.hidden_size, config.num_hidden_layers


# ---------------------------------------------------------------- safety checks


def disk_needed(cfg: PipelineConfig, runtime: Runtime, base_params: int, lora_params: int,
                data_bytes: int) -> dict[str, int]:
    """Bytes the run will write: each checkpoint holds the adapter (fp32) and AdamW's two moments,
    `save_total_limit` of them live at once; then the final adapter, a merged export in bf16/fp32
    if asked, and a copy of the data."""
    tc = cfg.train
    adapter = lora_params * 4
    parts = {"checkpoints": tc.save_total_limit * (adapter + 2 * adapter + (1 << 20)), "adapter": adapter,
             "data": data_bytes}
    if tc.merge:
        parts["merged"] = base_params * (2 if runtime.compute_dtype == "bfloat16" else 4)
    return parts


def check_disk(where: Path, needed: dict[str, int]) -> None:
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    total = sum(needed.values())
    if total > free:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in needed.items())
        raise RuntimeError(f"not enough disk at {where}: training needs about {total / 2**20:.1f} MiB ({parts}) "
                           f"but only {free / 2**20:.1f} MiB is free. Free space, lower train.save_total_limit, "
                           "turn off train.merge, or point artifact_root elsewhere.")


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    estimate_gib: float


def choose_micro_batch(fixed: float, per_sample: float, per_sample_checkpointed: float, budget: float,
                       effective_batch: int) -> MemoryPlan:
    """The fastest plan whose estimate fits in `budget` bytes, keeping the effective batch (micro-batch
    x accumulation): the largest micro-batch dividing it without activation checkpointing, else the
    largest with checkpointing (recomputation costs ~30% of step time; small micro-batches cost more)."""
    sizes = [m for m in range(effective_batch, 0, -1) if effective_batch % m == 0]
    for checkpointing, per in ((False, per_sample), (True, per_sample_checkpointed)):
        for m in sizes:
            if fixed + m * per <= budget:
                return MemoryPlan(m, effective_batch // m, checkpointing, (fixed + m * per) / 2**30)
    raise RuntimeError(f"the model needs about {(fixed + per_sample_checkpointed) / 2**30:.1f} GiB of GPU memory even "
                       f"at micro-batch 1 with activation checkpointing, the budget is {budget / 2**30:.1f} GiB: use "
                       "quantization=nf4, a smaller max_length, or a bigger GPU")


def plan_gpu_memory(base_params: int, lora_params: int, hidden: int, layers: int, four_bit: bool, tc: TrainConfig,
                    max_length: int) -> MemoryPlan:
    """Micro-batch, accumulation and activation checkpointing from a rough estimate against the GPU:
    weights (NF4 ~0.55 byte/param, else bf16), LoRA with AdamW (16 bytes/param) and activations
    (~34 bytes per token per hidden unit per layer in bf16 without checkpointing, ~2 with it),
    within `train.memory_budget` of the GPU (and what is free). Refuses before training when nothing
    fits. CPU, or `auto_micro_batch` off: the configured micro-batch, no checkpointing."""
    import torch

    configured = MemoryPlan(tc.batch_size, tc.gradient_accumulation_steps, False, 0.0)
    if not torch.cuda.is_available():
        return configured
    free, total = torch.cuda.mem_get_info()
    budget = min(free, tc.memory_budget * total)
    fixed = base_params * (0.55 if four_bit else 2) + lora_params * 16
    per_sample, per_sample_checkpointed = max_length * hidden * layers * 34, max_length * hidden * layers * 2
    if tc.auto_micro_batch:
        return choose_micro_batch(fixed, per_sample, per_sample_checkpointed, budget,
                                  tc.batch_size * tc.gradient_accumulation_steps)
    # the configured micro-batch taken whole: checkpointing only if it must
    whole = choose_micro_batch(fixed, tc.batch_size * per_sample, tc.batch_size * per_sample_checkpointed, budget, 1)
    return MemoryPlan(tc.batch_size, tc.gradient_accumulation_steps, whole.activation_checkpointing, whole.estimate_gib)


CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_config.json",
                    "adapter_model.safetensors")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, bad header), or None: its header's tensors must
    end exactly where the file does."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 << 20:
                return f"{path.name}: no safetensors header"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
        return None if size == 8 + n + end else f"{path.name} is {size} bytes, its header needs {8 + n + end}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path.name} does not parse ({e})"


def torch_file_problem(path: Path) -> str | None:
    """Why a `torch.save` file (a zip) is unusable: a truncated one has no readable central directory."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
        return None
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path.name} is not a readable torch file ({e})"


def latest_valid_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` whose trainer state parses (at step N), whose optimizer, scheduler,
    RNG and adapter files are all there and whole (the adapter's safetensors header matches its
    size, the torch files are readable zips); broken ones are skipped with a log line."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
        if not list(ckpt.glob("rng_state*.pth")):
            missing.append("rng_state.pth")
        problem = f"missing {', '.join(missing)}" if missing else None
        if not problem:
            problem = safetensors_problem(ckpt / "adapter_model.safetensors") or next(
                (p for f in ("optimizer.pt", "scheduler.pt") if (p := torch_file_problem(ckpt / f))), None)
        if not problem:
            try:
                step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
                if step != int(ckpt.name.split("-")[-1]):
                    problem = f"trainer_state.json says step {step}"
            except (ValueError, KeyError) as e:
                problem = f"trainer_state.json does not parse ({e})"
        if problem is None:
            return ckpt
        log.warning("skipping %s: %s", ckpt, problem)
    return None


def training_failed(rc: int, work: Path, tc: TrainConfig) -> str:
    """What a failed training child means for the retry: a resume point, or a start from scratch."""
    how = f"stopped by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    ckpt = latest_valid_checkpoint(work / "checkpoints")
    if ckpt is not None:
        return f"training failed ({how}); {ckpt.name} in {ckpt.parent} is kept and a retry resumes from it"
    return (f"training failed ({how}) before any checkpoint was written (one every train.save_steps={tc.save_steps} "
            "steps): a retry starts from the beginning; the training child's error is in its output (the run's log)")


def per_rank(batch: int, accum: int, ranks: int, setting: str = "train.num_processes") -> tuple[int, int]:
    """The global batch (micro-batch x accumulation, as configured for one process) split between `ranks`
    processes: the accumulation divided first, then the micro-batch, so N processes train what one
    would (same global batch, same schedule); a ValueError naming the fields when it does not divide."""
    from_accum = math.gcd(accum, ranks)  # the part of the split the accumulation takes ...
    from_batch = ranks // from_accum  # ... and the rest, from the micro-batch
    if batch % from_batch == 0:
        return batch // from_batch, accum // from_accum
    raise ValueError(f"{setting}={ranks} must divide the global batch train.batch_size x "
                     f"train.gradient_accumulation_steps = {batch} x {accum}: each process takes an equal share")


def next_batch_plan(batch: int, accum: int) -> tuple[int, int] | None:
    """After an out-of-memory: half the micro-batch, twice the accumulation (same effective batch)."""
    return (batch // 2, accum * 2) if batch > 1 else None


CHILD = "synthtune.stages._train_child"
RAY_DRIVER = "synthtune.stages._train_ray"  # train.engine: ray: Ray Train's TorchTrainer runs the child's training


def launch_command(spec: Path, num_processes: int, four_bit: bool, device: str = "cuda") -> list[str]:
    """The child's command: a plain interpreter; `accelerate launch` across GPUs (DDP, FSDP for QLoRA); or,
    on a CPU, torch's own launcher with one rank per process on the gloo backend."""
    if num_processes == 1:
        return [sys.executable, "-m", CHILD, str(spec)]
    flags = ["--num_processes", str(num_processes), "--mixed_precision", "bf16"]
    if four_bit:  # QLoRA across GPUs: shard with FSDP, 4-bit weights kept as stored
        flags += ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                  "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_use_orig_params", "false",
                  "--fsdp_cpu_ram_efficient_loading", "true"]
    else:
        flags += ["--multi_gpu"]
    return ranks_command(CHILD, spec, num_processes, device, flags)


# ---------------------------------------------------------------- the stage


def work_dir(store: ArtifactStore, k: str) -> Path:
    """Where checkpoints of run `k` live until it finishes: beside the artifacts on a local root (a
    retry finds them), else in the local cache."""
    if store.local:
        return Path(store.root) / STAGE / ".work" / k
    from synthtune.tiny import cache_root

    return cache_root() / "work" / STAGE / k


def ray_storage(store: ArtifactStore, k: str) -> str:
    """Where Ray Train keeps run `k`'s checkpoints (train.engine: ray): under the artifact root, which every
    node reaches (the work folder itself on a local root; a path of the root's filesystem otherwise), so a
    worker lost on one node resumes on another."""
    return str(work_dir(store, k)) if store.local else store.path(STAGE, ".work", k)


def drop_work(store: ArtifactStore, k: str) -> None:
    """Run `k`'s work folder removed (committed: its checkpoints are no longer needed), and the
    `.work` folder above it once no other run uses it; on a remote root, Ray Train's checkpoints too."""
    work = work_dir(store, k)
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        work.parent.rmdir()
    if not store.local:
        with contextlib.suppress(FileNotFoundError):
            store.remove(STAGE, ".work", k)


def loss_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", color="#4c72b0")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _select(cfg: PipelineConfig, store: ArtifactStore, staging: Staging, data: Path, work: Path, k: str,
            parent: ArtifactRef | None) -> tuple[Path, int]:
    """The rows tonight trains on (train.data: new reads what `parent`'s chain never trained on, plus a
    replay sample seeded by the key `k`); writes `trained.parquet` (the chain's rows, with tonight's)
    and the row counts. Returns the rows' parquet and how many there are."""
    import pandas as pd

    tc = cfg.train
    rows = pd.read_parquet(data)
    before: set[tuple[str, str]] = set()
    if parent is not None:
        try:
            before = lineage.trained_rows(store, parent.key)
        except FileNotFoundError:  # an adapter made before lineage was recorded: everything counts as new
            log.warning("train/%s records no trained rows (%s): every row counts as new", parent.key, lineage.TRAINED)
    selecting = parent is not None and tc.data == "new"
    chosen, new, replayed = lineage.select(rows, before if selecting else None, tc.replay, seed=k)
    after = before | set(zip(chosen["id"].astype(str), chosen["row_hash"], strict=True))
    pd.DataFrame(sorted(after), columns=["id", "row_hash"]).to_parquet(staging.path / lineage.TRAINED, index=False)
    if selecting:
        counts = {"new": new, "replay": replayed}
    else:  # every row: those the chain never trained on are new, the others trained again
        again = sum(row in before for row in zip(chosen["id"].astype(str), chosen["row_hash"], strict=True))
        counts = {"new": len(chosen) - again, "replay": again}
    staging.rows.update(trained=len(chosen), **counts)
    if not selecting:
        return data, len(chosen)
    out = work / "rows.parquet"
    chosen.drop(columns=["row_hash"]).to_parquet(out, index=False)
    log.info("train: %d new rows and %d replayed of %d trained before (train.data: new, replay %s)", new, replayed,
             len(before), tc.replay)
    return out, len(chosen)


def _unchanged(staging: Staging, store: ArtifactStore, parent: ArtifactRef, start: dict) -> None:
    """Nothing new since `parent`: tonight's adapter is the parent's, unchanged."""
    with store.local_copy(parent) as folder:
        shutil.copytree(folder / "adapter", staging.path / "adapter")
        shutil.copy(folder / "loss.png", staging.path / "loss.png")
        metrics = json.loads((folder / "metrics.json").read_text())
    metrics.update(steps=0, optimizer_steps=0, tokens_trained=0, first_loss=None, last_loss=None, seconds=0.0,
                   note=f"nothing new since {parent.key}: its adapter, unchanged", **start)
    staging.extra.update(optimizer_steps=0, tokens_trained=0)
    (staging.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (staging.path / "loss_history.json").write_text("[]")
    staging.metrics.update(metrics)


def _train(cfg: PipelineConfig, store: ArtifactStore, staging: Staging, data_dir: Path, k: str, data_key: str,
           parent: ArtifactRef | None = None) -> None:
    import pyarrow.parquet as pq

    tc = cfg.train
    work = work_dir(store, k)
    work.mkdir(parents=True, exist_ok=True)
    data = data_dir / "data.parquet"
    needs = "prompt_ids" if tc.mode == "dpo" else "input_ids"
    columns = pq.read_schema(data).names
    if needs not in columns:
        kind = "preference (prompt/chosen/rejected)" if tc.mode == "dpo" else "SFT (messages or prompt/response)"
        raise ValueError(f"train.mode={tc.mode} needs {kind} rows from the template stage; {data} has "
                         f"{columns}")
    if parent is not None:
        lineage.check_shape(cfg, store, parent.key)
    planned = lineage.start(cfg, store, data_key) if tc.init == "champion" else None
    same = planned is not None and (planned.parent and planned.parent.key) == (parent and parent.key)
    start = {"init": parent.key if parent else "base", "student": cfg.student,
             "start": planned.why if same else (f"continues {parent.key}" if parent else "from base")}
    staging.extra.update(start)
    data, n_rows = _select(cfg, store, staging, data, work, k, parent)
    if n_rows == 0 and parent is not None:
        return _unchanged(staging, store, parent, start)
    runtime = resolve_runtime(tc)
    base_params, lora_params, hidden, layers = _shape(cfg)
    check_disk(work, disk_needed(cfg, runtime, base_params, lora_params, data.stat().st_size))
    plan = plan_gpu_memory(base_params, lora_params, hidden, layers, runtime.four_bit, tc, cfg.template.max_length)
    batch, accum, checkpointing = plan.micro_batch, plan.gradient_accumulation_steps, plan.activation_checkpointing
    if (batch, accum) != (tc.batch_size, tc.gradient_accumulation_steps) or checkpointing:
        log.info("memory plan: micro-batch %d x accumulation %d%s (estimate %.1f GiB)", batch, accum,
                 ", activation checkpointing" if checkpointing else "", plan.estimate_gib)
    batch, accum = per_rank(batch, accum, tc.ranks, "train.num_workers" if tc.engine == "ray" else "train.num_processes")
    run_cfg = cfg  # what the child trains with: a continued night has its own schedule
    if parent is not None:
        run_cfg = cfg.model_copy(update={"train": tc.model_copy(update={
            "learning_rate": tc.continue_learning_rate or tc.learning_rate, "epochs": tc.continue_epochs or tc.epochs})})
    with contextlib.ExitStack() as stack:  # the adapter it continues, on local disk for the child
        parent_dir = stack.enter_context(store.local_copy(parent)) if parent is not None else None
        for attempt in range(MAX_OOM_RETRIES + 1):
            spec = work / "spec.json"
            spec.write_text(json.dumps({"cfg": run_cfg.model_dump(mode="json"), "work": str(work), "data": str(data),
                                        "batch_size": batch, "gradient_accumulation_steps": accum,
                                        "activation_checkpointing": checkpointing, "runtime": asdict(runtime),
                                        "parent_adapter": str(parent_dir / "adapter") if parent_dir else None,
                                        "ray_storage": ray_storage(store, k)}))
            for stale in ("progress.jsonl", "error.txt", budget.STOPPED, OOM_MARK):
                (work / stale).unlink(missing_ok=True)
            shutil.rmtree(work / "ranks", ignore_errors=True)
            shutil.rmtree(work / "final", ignore_errors=True)
            cmd = ([sys.executable, "-m", RAY_DRIVER, str(spec)] if tc.engine == "ray" else
                   launch_command(spec, tc.num_processes, runtime.four_bit, runtime.device))
            rc = run_group(cmd, work / "progress.jsonl")
            if rc == 0:
                break
            if rc == BUDGET_EXIT:
                raise budget.BudgetError(budget.gpu_stop_message(json.loads((work / budget.STOPPED).read_text()),
                                                                 cfg.cost.max_gpu_hours))
            if rc == OOM_EXIT and attempt < MAX_OOM_RETRIES and (plan := next_batch_plan(batch, accum)):
                log.warning("out of memory at micro-batch %d: retrying with micro-batch %d x accumulation %d",
                            batch, *plan)
                batch, accum = plan
                continue
            raise RuntimeError(training_failed(rc, work, tc))
    final = work / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    counted = {"optimizer_steps": metrics["steps"],
               "tokens_trained": round(metrics["tokens_per_epoch"] * (metrics.get("epochs") or run_cfg.train.epochs))}
    ranks = [json.loads(p.read_text()) for p in sorted((work / "ranks").glob("rank*.json"))]
    metrics.update(start, learning_rate=run_cfg.train.learning_rate, ranks=ranks, **counted)
    staging.extra.update(counted)
    history = json.loads((final / "loss_history.json").read_text())
    shutil.copytree(final / "adapter", staging.path / "adapter")
    data_keys = {"template": data_key, **store.lineage("template", data_key, ("filter", "generate"))}
    chain = [{"key": k, "rows": staging.rows, "created_at": "this adapter", "init": start["init"]},
             *(lineage.chain(store, parent.key) if parent else [])]
    from synthtune.config import to_yaml

    (staging.path / "adapter" / "README.md").write_text(
        cards.train_card(cfg, k, data_keys, metrics, to_yaml(cfg), chain))
    for problem in [p for part in ("adapter", "stops", "template") for p in metrics["serving"].get(part, {}).get(
            "problems", [])]:
        log.warning("serving: %s", problem)
    (staging.path / "loss_history.json").write_text(json.dumps(history, indent=2))
    (staging.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    loss_curve(history, staging.path / "loss.png", f"{cfg.name}: {tc.mode} loss")
    staging.metrics.update(metrics, base_params=base_params, lora_params=lora_params)


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef], output_key: str | None = None,
        rebuild: bool = False) -> ArtifactRef:
    """Train an adapter on `upstream['template']`'s rows, from base or continuing `upstream['parent']`
    (train.init: champion), or reuse the output of the same key (a retry resumes from the newest valid
    checkpoint and reads the same rows); then, with train.merge, add the merged export."""
    src, parent = upstream["template"], upstream.get("parent")
    ups = {"template": src, **({"parent": parent} if parent is not None else {})}
    k = output_key or key(cfg, {name: ref.digest for name, ref in ups.items()})

    def build(staging: Staging) -> None:
        with store.local_copy(src) as folder:
            _train(cfg, store, staging, folder, k, src.key, parent)

    ref = produce(store, STAGE, k, {name: ref.key for name, ref in ups.items()}, key_payload(cfg.train), build, rebuild)
    drop_work(store, k)
    if cfg.train.merge:
        ref = export_merged(cfg, store, ref, src)
    return ref


MERGED = "merged"


def export_merged(cfg: PipelineConfig, store: ArtifactStore, ref: ArtifactRef, data: ArtifactRef) -> ArtifactRef:
    """The base with the adapter merged in (safetensors, bf16 or fp32), added to the finished train
    output `ref` as `merged/`, once. The adapter is loaded onto the unquantized base, greedy tokens on
    8 held prompts from `data` are generated by it and by the export as saved and loaded again, and
    must be identical: the first prompt that differs raises ServingError naming it. The output's key
    and digest stay: the adapter did not change."""
    from synthtune.serving import ServingError

    with store.key_lock(STAGE, ref.key):
        manifest = store.manifest(STAGE, ref.key)
        if any(rel.startswith(f"{MERGED}/") for rel in manifest["files"]):
            return ref
        work = work_dir(store, ref.key) / "merge"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with store.local_copy(ref) as out, store.local_copy(data) as rows:
                spec = work / "spec.json"
                spec.write_text(json.dumps({"cfg": cfg.model_dump(mode="json"), "adapter": str(out / "adapter"),
                                            "data": str(rows / "data.parquet"), "out": str(work),
                                            "runtime": asdict(resolve_runtime(cfg.train))}))
                rc = run_group([sys.executable, "-m", CHILD, "--merge", str(spec)])
            if rc == SERVING_EXIT:
                raise ServingError((work / "error.txt").read_text())
            if rc:
                raise RuntimeError(f"merging {ref.key}'s adapter into the base failed (exit code {rc}); the child's "
                                   "error is in the run's log")
            parity = json.loads((work / "parity.json").read_text())
            serving = {**manifest["metrics"]["serving"], "merge_parity": parity}
            card = store.fs.cat_file(store.path(STAGE, ref.key, "adapter", "README.md")).decode()
            store.amend(STAGE, ref.key, held=True, folders={MERGED: work / MERGED},
                        texts={"adapter/README.md": cards.with_serving(card, serving)}, metrics={"serving": serving})
        finally:
            drop_work(store, ref.key)
    log.info("train/%s: merged export added (%d held prompts identical)", ref.key, parity["identical"])
    return store.ref(STAGE, ref.key)
