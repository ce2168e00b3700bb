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


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="needs vLLM (synthtune[vllm])")
def test_vllm_scores_base_and_adapter_like_the_hf_backend(demo_run):
    """evaluate.backend: vllm, the adapter served as a LoRA: its own key, and the demo's scores of the
    HF backend (log-likelihoods from other kernels: accuracy within two items of 32)."""
    from synthtune.stages import evaluate
    from synthtune.store import ArtifactStore

    cfg, refs = demo_run
    store = ArtifactStore(cfg.artifact_root)
    on_vllm = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"backend": "vllm"})})
    for model, upstream in (("base", {}), ("tuned", {"train": refs["train"]})):
        ref = evaluate.run(on_vllm, store, upstream)
        hf = refs[f"evaluate[{model}]"]
        assert ref.key != hf.key and ref.summary["backend"] == "vllm"
        acc, expected = (r.summary["scores"]["demo_facts"]["acc"] for r in (ref, hf))
        assert abs(acc - expected) <= 2 / 32, (model, acc, expected)
