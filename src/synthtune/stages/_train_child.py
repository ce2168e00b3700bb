"""The train stage's child process: TRL + PEFT on the template stage's token ids.

Started by `synthtune.stages.train` (never imported by the parent) as
`python -m synthtune.stages._train_child SPEC.json`, in its own process group, so it dies with its
parent and a cancelled run never leaves a process holding the GPU. It trains once (resuming from the
newest valid checkpoint), writes `final/` (adapter, metrics, loss history) and exits 0, or exits
`OOM_EXIT` when CUDA runs out of memory so the parent can halve the micro-batch, or `BUDGET_EXIT` when
cost.max_gpu_hours stopped it at a checkpoint (`over_budget.json` says where; synthtune.budget).

`python -m synthtune.stages._train_child --merge SPEC.json` merges a saved adapter into the
unquantized base instead (train.merge) and checks that the export generates what the adapter does;
it exits `SERVING_EXIT` (the reason in `error.txt`) when it would not (synthtune.serving).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthtune import budget, parity
from synthtune.models import resolve, revision_kw
from synthtune.stages.train import (
    BUDGET_EXIT,
    OOM_EXIT,
    PEAK_FLOPS,
    SERVING_EXIT,
    Runtime,
    fix_cpu_4bit,
    latest_valid_checkpoint,
    load_student,
    lora_config,
)

STAGE = "train"


def trainer_args(cfg, output_dir: str, batch: int, accum: int, runtime: Runtime, checkpointing: bool = False):
    """TRL's SFTConfig / DPOConfig for this run (also what bench/train.py times as 'synthtune')."""
    from trl import DPOConfig, SFTConfig

    from synthtune.tracking import report_to

    tc = cfg.train
    common = dict(
        output_dir=output_dir, num_train_epochs=tc.epochs, max_steps=tc.max_steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accum, learning_rate=tc.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=tc.warmup_ratio, logging_steps=tc.logging_steps,
        save_strategy="steps", save_steps=tc.save_steps, save_total_limit=tc.save_total_limit,
        report_to=report_to(cfg), run_name=cfg.name, seed=tc.seed, data_seed=tc.seed,
        bf16=runtime.compute_dtype == "bfloat16", fp16=False,  # TRL defaults to bf16, which fails on CPU
        use_cpu=runtime.device == "cpu", max_length=cfg.template.max_length, dataloader_num_workers=0,
        disable_tqdm=True, use_liger_kernel=runtime.liger,
        activation_checkpointing=checkpointing,  # TRL turns it on by default; only when memory needs it here
    )
    if tc.mode == "dpo":
        return DPOConfig(beta=tc.beta, **common)
    return SFTConfig(packing=runtime.packing, **common)


def _first_step_callback():
    """A callback recording the first optimizer step this process ran: resumed+1 after a resume."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        step: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.step is None:
                self.step = state.global_step

    return FirstStep()


def _rank_callback(work: Path):
    """A callback each rank (process) runs: at the end it writes what it stepped (`ranks/rank{N}.json`),
    which the parent puts in the metrics: every rank of a multi-process run is seen to train."""
    from transformers import TrainerCallback

    class Rank(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            import resource

            import torch

            folder = work / "ranks"
            folder.mkdir(exist_ok=True)
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            (folder / f"rank{args.process_index}.json").write_text(json.dumps({
                "rank": args.process_index, "world_size": args.world_size, "steps": self.steps,
                "examples": self.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps,
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # KiB on Linux
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}))

    return Rank()


def _progress_callback(path: Path, tokens_per_epoch: int):
    """A callback writing one JSON line per optimizer step (step, total, loss, tokens/s) to `path`,
    which the parent tails for the terminal's progress bar."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.start, self.epoch0, self.loss = None, None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.epoch0 = time.perf_counter(), state.epoch or 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]

        def on_step_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # one line per step, from rank 0
                return
            seconds = time.perf_counter() - (self.start or time.perf_counter())
            done = (state.epoch or 0.0) - (self.epoch0 or 0.0)
            record = {"step": state.global_step, "total": state.max_steps, "loss": self.loss,
                      "tokens_per_s": round(tokens_per_epoch * done / seconds, 1) if seconds > 0 else None}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return Progress()


def _budget_callback(work: Path, max_hours: float | None, device: str):
    """A callback counting device-hours (devices x hours; hours of training on a CPU) over every attempt
    of this training, recorded at each checkpoint; over cost.max_gpu_hours it stops training right after
    the checkpoint it just saved and writes why (synthtune.budget)."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def __init__(self):
            self.start, self.before = time.monotonic(), budget.hours_used(work)

        def on_save(self, args, state, control, **kwargs):
            stop = False
            if state.is_world_process_zero:  # rank 0 counts and decides ...
                devices = args.world_size if device != "cpu" else 1
                used = self.before + (time.monotonic() - self.start) * devices / 3600
                budget.record_hours(work, used)
                if max_hours is not None and used > max_hours:
                    stop = True
                    (work / budget.STOPPED).write_text(json.dumps({
                        "hours": used, "step": state.global_step, "devices": devices, "device": device,
                        "checkpoint": str(Path(args.output_dir) / f"checkpoint-{state.global_step}")}))
            if args.world_size > 1:  # ... and every rank stops with it (a rank stepping alone would hang)
                import torch.distributed as dist

                decision = [stop]
                dist.broadcast_object_list(decision, src=0)
                stop = decision[0]
            if stop:
                control.should_training_stop = True

    return Budget()


def _pretokenized_dpo(base):
    """TRL 1.16's DPOTrainer re-tokenizes from text; ours takes the template stage's ids as they are
    (prompt budget and max_length already enforced there), so training sees exactly what was reported."""

    class PretokenizedDPOTrainer(base):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


@dataclass
class Finished:
    """What one training run leaves for `_finish` to save and measure."""

    cfg: Any
    runtime: Runtime
    trainer: Any
    model: Any
    tokenizer: Any
    dataset: Any
    before: dict  # trainable parameter name -> its value before training
    result: Any  # TrainOutput
    seconds: float
    resumed: int  # the global step resumed from (0: a fresh start)
    first_step: int | None  # the first optimizer step this process ran
    cpu_4bit_layers_fixed: int
    batch: int
    accum: int
    work: Path
    data: Path
    continued: bool = False  # started from a parent adapter (train.init: champion)


def _serving_checks(run: Finished, adapter: Path) -> dict:
    """The saved adapter and tokenizer as a server would take them (the merged export is checked by
    `merge`, when train.merge asks for it)."""
    from transformers import AutoTokenizer

    from synthtune import serving

    cfg, model = run.cfg, run.model
    saved = AutoTokenizer.from_pretrained(adapter)
    base_tok = AutoTokenizer.from_pretrained(resolve(cfg.student), **revision_kw(cfg.student_revision))
    eos = model.generation_config.eos_token_id
    stops = serving.check_stops(saved, eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return {"adapter": serving.inspect_adapter(adapter, len(base_tok), len(saved)), "stops": stops,
            "template": parity.serving_check(cfg, saved, base_tok), "merge_parity": None}


def merge(spec_path: str) -> int:
    """The merged export of a saved adapter, checked: greedy tokens on held prompts from the adapter
    (on the unquantized base) and from the export as saved and loaded again must be identical."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthtune import serving
    from synthtune.configs import PipelineConfig

    spec = json.loads(Path(spec_path).read_text())
    cfg, out = PipelineConfig.model_validate(spec["cfg"]), Path(spec["out"])
    runtime = Runtime(**spec["runtime"])
    saved = AutoTokenizer.from_pretrained(spec["adapter"])
    base = load_student(cfg.student, runtime, four_bit=False, revision=cfg.student_revision)
    reference = PeftModel.from_pretrained(base, spec["adapter"]).eval()
    eos = reference.generation_config.eos_token_id
    stops = serving.check_stops(saved, eos if isinstance(eos, list) else [eos] if eos is not None else [])
    stop_ids = sorted({*stops.get("stop_ids", []), *([stops["end_of_turn_id"]] if stops.get("end_of_turn_id") else [])})
    prompts = serving.held_prompts(Path(spec["data"]), cfg.train.mode, k=8)
    adapter_out = serving.greedy(reference, prompts, stop_ids)
    merged = reference.merge_and_unload()
    dtype = next(merged.parameters()).dtype
    merged.generation_config.eos_token_id = stop_ids or merged.generation_config.eos_token_id  # the export stops
    merged.save_pretrained(out / "merged", safe_serialization=True)
    saved.save_pretrained(out / "merged")
    del merged, reference
    device = "cuda" if runtime.device == "cuda" else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=dtype, device_map={"": device}).eval()
    try:
        parity = serving.parity(saved, prompts, adapter_out, serving.greedy(loaded, prompts, stop_ids))
    except serving.ServingError as e:  # deterministic: the parent reports it as it is, no retry hint
        (out / "error.txt").write_text(str(e))
        return SERVING_EXIT
    (out / "parity.json").write_text(json.dumps(parity))
    return 0


def _finish(run: Finished) -> None:
    """Save the adapter (and a merged export if asked) and the run's metrics into `work/final`."""
    import torch

    tc, trainer, model = run.cfg.train, run.trainer, run.model
    changed = sum(int(not torch.equal(run.before[n], p.detach())) for n, p in model.named_parameters() if n in run.before)
    history = [h for h in trainer.state.log_history if "loss" in h]
    steps_run = trainer.state.global_step - run.resumed
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"] if tc.mode == "dpo" else ["input_ids"]
    tokens_per_epoch = sum(sum(len(x) for x in run.dataset[c]) for c in columns)
    epochs_run = (trainer.state.epoch or 1) * steps_run / max(trainer.state.global_step, 1)
    tokens_per_s = tokens_per_epoch * epochs_run / run.seconds if run.seconds else None
    n_params = sum(p.numel() for p in model.parameters())
    cuda = run.runtime.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    # MFU: a frozen base costs ~2N FLOPs per token forward and ~2N backward (activation gradients only)
    mfu = tokens_per_s * 4 * n_params / peak if peak and tokens_per_s else None
    final = run.work / "final"
    adapter = final / "adapter"
    model.save_pretrained(adapter, selected_adapters=["default"])  # not DPO's frozen "ref" copy
    # the template a server renders with is the one evaluated: variables pinned, a refused system role folded
    run.tokenizer.chat_template = parity.eval_template(parity.encoder(run.cfg, run.tokenizer))
    run.tokenizer.save_pretrained(adapter)
    serving = _serving_checks(run, adapter)
    metrics = {
        "mode": tc.mode, "train_loss": round(float(run.result.training_loss), 4),
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "steps": trainer.state.global_step, "resumed_from_step": run.resumed, "first_step_this_run": run.first_step,
        "seconds": round(run.seconds, 2),
        "step_time_s": round(run.seconds / steps_run, 4) if steps_run else None,
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "mfu": round(mfu, 4) if mfu else None, "device": device,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "quantization": run.runtime.quantization, "micro_batch": run.batch, "gradient_accumulation_steps": run.accum,
        "packing": run.runtime.packing, "liger": run.runtime.liger,
        "activation_checkpointing": bool(trainer.args.activation_checkpointing),
        "trainable_params": len(run.before), "trainable_params_changed": changed,
        "cpu_4bit_layers_fixed": run.cpu_4bit_layers_fixed, "serving": serving,
        "tokens_per_epoch": tokens_per_epoch, "epochs": trainer.state.epoch,
        # DPO's reference: TRL copies the starting adapter into a frozen "ref" adapter (base + champion
        # when continuing; a fresh adapter is zero, so base), or uses the base when there is none
        "reference": (("base + the adapter it continues" if run.continued else "base")
                      if "ref" in getattr(model, "peft_config", {}) else "base") if tc.mode == "dpo" else None,
    }
    (final / "loss_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2))


def main(spec_path: str, resume_from: Path | None = None, newest: bool = True, callbacks: tuple = ()) -> int:
    """Train once and write `final/`; returns the exit code (OOM_EXIT on CUDA out of memory). It resumes
    from `resume_from` or, with `newest`, from the newest valid checkpoint in the work folder (under Ray,
    Ray's checkpoint is the one: synthtune.stages._train_ray). `callbacks` join the trainer's."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import DPOTrainer, SFTTrainer

    from synthtune.configs import PipelineConfig

    spec = json.loads(Path(spec_path).read_text())
    cfg = PipelineConfig.model_validate(spec["cfg"])
    runtime = Runtime(**spec["runtime"])
    tc, work = cfg.train, Path(spec["work"])
    batch, accum = spec["batch_size"], spec["gradient_accumulation_steps"]
    try:
        torch.manual_seed(tc.seed)
        columns = ["prompt_ids", "chosen_ids", "rejected_ids"] if tc.mode == "dpo" else ["input_ids", "assistant_masks"]
        dataset = Dataset.from_parquet(spec["data"]).select_columns(columns)
        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.student), **revision_kw(cfg.student_revision))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = load_student(cfg.student, runtime, revision=cfg.student_revision)
        if spec.get("parent_adapter"):  # train.init: champion: its adapter, trainable, is where training starts
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, spec["parent_adapter"], is_trainable=True)
        else:
            model = get_peft_model(base, lora_config(tc))
        fixed = fix_cpu_4bit(model) if runtime.four_bit and runtime.device == "cpu" else 0
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = trainer_args(cfg, str(work / "checkpoints"), batch, accum, runtime, spec.get("activation_checkpointing", False))
        trainer_cls = _pretokenized_dpo(DPOTrainer) if tc.mode == "dpo" else SFTTrainer
        first_step = _first_step_callback()
        columns_ = ["prompt_ids", "chosen_ids", "rejected_ids"] if tc.mode == "dpo" else ["input_ids"]
        progress = _progress_callback(work / "progress.jsonl", sum(sum(len(x) for x in dataset[c]) for c in columns_))
        device = torch.cuda.get_device_name() if runtime.device == "cuda" else "cpu"
        spending = _budget_callback(work, cfg.cost.max_gpu_hours, device)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[first_step, progress, spending, _rank_callback(work), *callbacks])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # raw {'loss': ...} dicts: the progress file has them
        resume = resume_from or (latest_valid_checkpoint(work / "checkpoints") if newest else None)
        resumed = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
        if runtime.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as e:
        print(f"synthtune: CUDA out of memory at micro-batch {batch}: {e}", file=sys.stderr)
        return OOM_EXIT
    if (work / budget.STOPPED).is_file():  # stopped at a checkpoint by cost.max_gpu_hours: no adapter yet
        return BUDGET_EXIT
    if trainer.accelerator.is_main_process:
        _finish(Finished(cfg=cfg, runtime=runtime, trainer=trainer, model=model, tokenizer=tokenizer,
                         dataset=dataset, before=before, result=result, seconds=seconds, resumed=resumed,
                         first_step=first_step.step, cpu_4bit_layers_fixed=fixed, batch=batch, accum=accum,
                         work=work, data=Path(spec["data"]), continued=bool(spec.get("parent_adapter"))))
    return 0


if __name__ == "__main__":
    sys.exit(merge(sys.argv[2]) if sys.argv[1] == "--merge" else main(sys.argv[1]))
