"""The real QLoRA path (NF4 base, bf16 compute) on CUDA. Skipped without a GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_on_cuda_trains_every_lora_parameter(demo_run):
    from synthtune.stages import train
    from synthtune.store import ArtifactStore

    cfg, refs = demo_run
    auto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"quantization": "auto", "epochs": 10})})
    ref = train.run(auto, ArtifactStore(cfg.artifact_root), {"template": refs["template"]})
    assert ref.summary["quantization"] == "nf4"
    assert ref.summary["trainable_params_changed"] == ref.summary["trainable_params"] > 0
    assert ref.summary["last_loss"] < ref.summary["first_loss"]
