"""train: real TRL + PEFT on the tiny student; every LoRA parameter moves, the loss falls."""

from __future__ import annotations

import json

import pytest

from synthtune.artifacts import ArtifactStore
from synthtune.stages import train

pytestmark = pytest.mark.integration


def _check_trained(ref):
    s = ref.summary
    assert s["trainable_params_changed"] == s["trainable_params"] > 0
    assert s["last_loss"] < 0.8 * s["first_loss"]
    history = json.loads(open(f"{ref.uri}/loss_history.json").read())
    assert len(history) >= 3


def test_lora_sft_on_cpu(demo_run):
    cfg, refs = demo_run
    ref = refs["train"]
    _check_trained(ref)
    assert ref.summary["quantization"] == "none"

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve(cfg.student), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, f"{ref.uri}/adapter")
    lora = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # B starts at zero: non-zero means it learned


def test_qlora_nf4_path_on_cpu(demo_run):
    """Real bitsandbytes 4-bit on CPU, with the Linear4bit avx512bf16 fix applied to every layer."""
    cfg, refs = demo_run
    nf4 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"quantization": "nf4", "epochs": 10})})
    ref = train.run(nf4, ArtifactStore(cfg.artifact_root), {"template": refs["template"]})
    _check_trained(ref)
    assert ref.summary["quantization"] == "nf4"
    assert ref.summary["cpu_4bit_layers_fixed"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
