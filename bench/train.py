"""Training throughput: synthtune's train defaults against plain TRL defaults, side by side in one process.

Run as: .venv/bin/python -m bench.train                  (CPU: the tiny shape)
        python -m bench.train --shapes 1b 8b --steps 30    (a GPU machine: Llama-3 1B and 8B shapes)

Both sides train LoRA r=16 (NF4 QLoRA when CUDA is present) on the same random-weight model of the
given shape and the same pre-tokenized rows (random ids, lengths 64..max_length, loss on the second
half). "TRL defaults" is `SFTConfig` left at its defaults but for what CPU needs (no bf16) and the
same micro-batch; "synthtune" is what the train stage builds from the runtime it resolves
(`resolve_runtime` and `_train_child.trainer_args`: packing with FlashAttention when available,
liger kernels when installed). Printed per shape: tokens/s (real,
non-pad tokens), peak memory and the ratio; MFU counts 4 FLOPs per parameter per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {  # Llama-style shapes: hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (256, 4, 8, 4, 688, 2048),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}
ROOT = Path(__file__).resolve().parents[1]


def make_model(shape: str, folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from synthtune.tiny import build_tokenizer

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    tok = build_tokenizer()
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=max(vocab, len(tok)),
                         max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def make_rows(n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(64, max_length)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "assistant_masks": [0] * (length // 2) + [1] * (length - length // 2)})
    return rows


class PeakMemory:
    """Peak GPU memory, or the process's peak RSS sampled every 50 ms on CPU."""

    def __enter__(self):
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        proc, self.stop = psutil.Process(), threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()


def train_once(cfg, runtime, args, rows) -> tuple[float, float, int]:
    """(tokens/s, peak GiB, parameters) for one trainer over `rows`: the stage's own model loading
    (`load_student` with the resolved runtime, the CPU 4-bit fix) and TRL's SFTTrainer."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from synthtune.models import resolve
    from synthtune.stages.train import fix_cpu_4bit, load_student, lora_config

    tok = AutoTokenizer.from_pretrained(resolve(cfg.student))
    with PeakMemory() as mem:
        model = get_peft_model(load_student(cfg.student, runtime), lora_config(cfg.train))
        if runtime.four_bit and runtime.device == "cpu":
            fix_cpu_4bit(model)
        n_params = sum(p.numel() for p in model.parameters())
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tokens = sum(len(r["input_ids"]) for r in rows)  # one epoch over every row
    return tokens / seconds, mem.peak / 2**30, n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import torch
    from trl import SFTConfig

    from synthtune.config import load_config
    from synthtune.stages._train_child import trainer_args
    from synthtune.stages.train import PEAK_FLOPS, resolve_runtime

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device), None)
    print(f"device: {device}; LoRA r=16 on all linear layers, {'NF4 QLoRA' if cuda else 'fp32 LoRA'}")
    print(f"{'shape':<6}{'setup':<18}{'tokens/s':>11}{'peak GiB':>10}{'MFU':>8}")
    for shape in args.shapes:
        with tempfile.TemporaryDirectory(prefix="synthtune-bench-train-") as tmp:
            model_dir = make_model(shape, Path(tmp) / "model")
            cfg = load_config(ROOT / "configs" / "demo.yaml", [
                f"student={model_dir}", f"artifact_root={tmp}/artifacts", "train.lora.alpha=32",
                f"template.max_length={args.max_length}", f"train.batch_size={args.batch}"])
            rows = make_rows(args.steps * args.batch, args.max_length, SHAPES[shape][5])
            common = dict(output_dir=f"{tmp}/out", per_device_train_batch_size=args.batch, num_train_epochs=1,
                          report_to="none", save_strategy="no", max_length=args.max_length, disable_tqdm=True)
            trl_args = SFTConfig(**common, **({} if cuda else {"bf16": False, "use_cpu": True}))
            # the runtime the stage resolves here (packing with FlashAttention, liger when installed)
            ours_runtime = resolve_runtime(cfg.train)
            ours = trainer_args(cfg, f"{tmp}/out2", args.batch, 1, ours_runtime)
            ours.save_strategy, ours.num_train_epochs, ours.max_steps = "no", 1, -1
            # TRL defaults: the same quantization, no packing, liger or special attention kernel
            plain = dataclasses.replace(ours_runtime, packing=False, liger=False, attn_implementation=None)
            results = {}
            for name, runtime, targs in (("TRL defaults", plain, trl_args), ("synthtune", ours_runtime, ours)):
                tps, mem, n_params = train_once(cfg, runtime, targs, rows)
                mfu = tps * 4 * n_params / peak if peak else None
                results[name] = tps
                print(f"{shape:<6}{name:<18}{tps:>11.0f}{mem:>10.2f}{(f'{mfu:.1%}' if mfu else '-'):>8}")
            print(f"{shape:<6}{'ratio':<18}{results['synthtune'] / results['TRL defaults']:>10.2f}x")


if __name__ == "__main__":
    main()
