"""train: LoRA / QLoRA supervised fine-tuning of the student with TRL + PEFT.

Consumes the template stage's tokenized rows (`input_ids`, `assistant_masks`) untouched. QLoRA
(bitsandbytes NF4, double quantization) whenever CUDA is present; full-precision LoRA on CPU,
where the 4-bit path is available too (`train.quantization=nf4`). Writes the adapter in PEFT
format with the tokenizer, the loss history and a small model card.

Run as: synthtune train configs/demo.yaml
"""

from __future__ import annotations

import json
import shutil
import time
from typing import TYPE_CHECKING, Literal

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import Section, field
from synthtune.models import fingerprint, resolve

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "train"
VERSION = "1"
UPSTREAM = ("template",)


class LoraParams(Section):
    r: int = field(16, "LoRA rank.", ge=1, le=1024)
    alpha: int = field(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).", ge=1)
    dropout: float = field(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    target_modules: str | list[str] = field(
        "all-linear", "Modules to adapt: `all-linear` or a list of module names such as [q_proj, v_proj]."
    )
    use_dora: bool = field(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = field(False, "Rank-stabilised scaling alpha / sqrt(r).")


class TrainConfig(Section):
    quantization: Literal["auto", "nf4", "none"] = field(
        "auto", "`nf4`: QLoRA (4-bit NF4 base). `none`: LoRA on a full-precision base. `auto`: nf4 when CUDA is present."
    )
    lora: LoraParams = field(default_factory=LoraParams, description="LoRA adapter settings.")
    learning_rate: float = field(2e-4, "Peak learning rate.", gt=0, le=1)
    epochs: float = field(1.0, "Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = field(-1, "Optimizer steps to run; -1 runs `epochs` instead.", ge=-1)
    batch_size: int = field(4, "Micro-batch size per device.", ge=1)
    gradient_accumulation_steps: int = field(1, "Micro-batches per optimizer step.", ge=1)
    warmup_ratio: float = field(0.0, "Share of optimizer steps spent warming up the learning rate.", ge=0, lt=1)
    seed: int = field(0, "Random seed for initialisation and data order.")
    logging_steps: int = field(5, "Log the loss every this many steps.", ge=1, affects_output=False)
    save_total_limit: int = field(2, "Checkpoints kept on disk.", ge=1, affects_output=False)


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    # max_length is the template stage's, already part of its key through upstream
    payload = {"train": key_payload(cfg.train), "student": fingerprint(cfg.student)}
    return stage_key(STAGE, VERSION, payload, upstream)


def use_4bit(tc: TrainConfig) -> bool:
    import torch

    return tc.quantization == "nf4" or (tc.quantization == "auto" and torch.cuda.is_available())


def lora_config(tc: TrainConfig):
    from peft import LoraConfig

    lc = tc.lora
    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
        use_dora=lc.use_dora, use_rslora=lc.use_rslora, bias="none", task_type="CAUSAL_LM",
    )


def load_student(spec: str, four_bit: bool):
    """The student ready for LoRA: NF4-quantized (QLoRA) or full precision."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict = {"dtype": compute if cuda else torch.float32}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(resolve(spec), **kwargs)


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


def sft_args(cfg: PipelineConfig, output_dir: str):
    import torch
    from trl import SFTConfig

    tc = cfg.train
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=output_dir,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps,
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        learning_rate=tc.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=tc.warmup_ratio,
        logging_steps=tc.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=bf16,  # TRL defaults to bf16, which fails on CPU
        fp16=False,
        use_cpu=not cuda,
        max_length=cfg.template.max_length,
        packing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _train(cfg: PipelineConfig, staging: Staging, data_dir) -> None:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tc = cfg.train
    torch.manual_seed(tc.seed)
    dataset = Dataset.from_parquet(str(data_dir / "data.parquet")).select_columns(["input_ids", "assistant_masks"])
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.student))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    four_bit = use_4bit(tc)
    model = load_student(cfg.student, four_bit)
    model = get_peft_model(model, lora_config(tc))
    fixed = fix_cpu_4bit(model) if four_bit and not torch.cuda.is_available() else 0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SFTTrainer(
        model=model, args=sft_args(cfg, str(staging.path / ".checkpoints")), train_dataset=dataset,
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    changed = sum(int(not torch.equal(before[n], p.detach())) for n, p in model.named_parameters() if n in before)
    tokens = sum(len(x) for x in dataset["input_ids"]) * (trainer.state.epoch or 1)
    history = [h for h in trainer.state.log_history if "loss" in h]
    adapter = staging.path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    shutil.rmtree(staging.path / ".checkpoints", ignore_errors=True)
    metrics = {
        "train_loss": round(float(result.training_loss), 4),
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "quantization": "nf4" if four_bit else "none",
        "trainable_params": len(before),
        "trainable_params_changed": changed,
        "cpu_4bit_layers_fixed": fixed,
    }
    (staging.path / "loss_history.json").write_text(json.dumps(history, indent=2))
    (staging.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (adapter / "README.md").write_text(model_card(cfg, metrics))
    staging.rows.update(train=len(dataset))
    staging.metrics.update(metrics)


def model_card(cfg: PipelineConfig, metrics: dict) -> str:
    return (
        f"# {cfg.name} adapter\n\nLoRA adapter for `{cfg.student}` trained by synthtune.\n\n"
        f"```json\n{json.dumps({'train': cfg.train.model_dump(mode='json'), 'metrics': metrics}, indent=2)}\n```\n"
    )


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    src = upstream["template"]

    def build(staging: Staging) -> None:
        with store.local_copy(src) as folder:
            _train(cfg, staging, folder)

    ups = {"template": src.key}
    return produce(store, STAGE, key(cfg, ups), ups, key_payload(cfg.train), build)
