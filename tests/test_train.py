"""train: real TRL + PEFT on the tiny student in a child process; resumable, safe with disk and memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from synthtune.stages import template, train
from synthtune.stages.train import (
    CHECKPOINT_FILES,
    latest_valid_checkpoint,
    launch_command,
    next_batch_plan,
    param_counts,
    work_dir,
)
from synthtune.store import ArtifactStore, produce
from tests.support import demo_preference_pairs
from tests.support.faults import OOM_ABOVE_BATCH, inject

ROOT = Path(__file__).resolve().parents[1]


def _with_train(cfg, **update):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def _check_trained(ref):
    s = ref.summary
    assert s["trainable_params_changed"] == s["trainable_params"] > 0
    assert s["last_loss"] < 0.8 * s["first_loss"]
    assert len(json.loads(open(f"{ref.uri}/loss_history.json").read())) >= 3
    assert open(f"{ref.uri}/loss.png", "rb").read(4) == b"\x89PNG"


# ---------------------------------------------------------------- unit


def _checkpoint(folder: Path, step: int, files=CHECKPOINT_FILES, state: str | None = None) -> Path:
    """A checkpoint folder as the Trainer writes it: real safetensors and torch files."""
    import torch
    from safetensors.torch import save_file

    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for f in files:
        if f == "adapter_model.safetensors":
            save_file({"lora_A": torch.zeros(4, 8)}, str(ckpt / f))
        elif f.endswith(".pt"):
            torch.save({"step": step}, ckpt / f)
        else:
            (ckpt / f).write_text(state if f == "trainer_state.json" and state else json.dumps({"global_step": step}))
    (ckpt / "rng_state.pth").write_text("rng")
    return ckpt


def test_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    good = _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 40, files=[f for f in CHECKPOINT_FILES if f != "optimizer.pt"])
    _checkpoint(tmp_path, 60, state="{half written")
    truncated = _checkpoint(tmp_path, 80) / "adapter_model.safetensors"  # the crash hit while saving the adapter
    truncated.write_bytes(truncated.read_bytes()[:-40])
    broken_optimizer = _checkpoint(tmp_path, 100) / "optimizer.pt"
    broken_optimizer.write_bytes(broken_optimizer.read_bytes()[:50])
    assert latest_valid_checkpoint(tmp_path) == good
    assert "checkpoint-60: trainer_state.json does not parse" in caplog.text
    assert "checkpoint-40: missing optimizer.pt" in caplog.text
    assert "checkpoint-80: adapter_model.safetensors is" in caplog.text and "its header needs" in caplog.text
    assert "checkpoint-100: optimizer.pt is not a readable torch file" in caplog.text


def test_a_committed_run_drops_its_work_and_the_work_folder_with_the_last_one(tmp_path):
    store = ArtifactStore(str(tmp_path))
    a, b = work_dir(store, "a"), work_dir(store, "b")
    for w in (a, b):
        (w / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    train.drop_work(store, "a")
    assert not a.exists() and b.exists()  # another run's checkpoints stay
    train.drop_work(store, "b")
    assert not b.exists() and not b.parent.exists()


def test_the_retry_hint_is_true(tmp_path):
    from synthtune.stages.train import TrainConfig, training_failed

    tc = TrainConfig(save_steps=50)
    assert "before any checkpoint was written (one every train.save_steps=50 steps): a retry starts from the " \
           "beginning" in training_failed(1, tmp_path, tc)
    _checkpoint(tmp_path / "checkpoints", 50)
    assert training_failed(-15, tmp_path, tc) == (f"training failed (stopped by SIGTERM); checkpoint-50 in "
                                                  f"{tmp_path / 'checkpoints'} is kept and a retry resumes from it")


def test_infinite_or_nan_numbers_are_refused_at_validation():
    from synthtune.config import ConfigError, load_config
    from tests.support import DEMO

    for bad in ("train.epochs=.inf", "train.learning_rate=.nan", "filter.near_dedup_threshold=.nan"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.") + ": Input should be a finite"):
            load_config(DEMO, [bad])


def test_oom_plan_keeps_the_effective_batch():
    assert next_batch_plan(8, 1) == (4, 2)
    assert next_batch_plan(1, 8) is None


def test_multi_gpu_launch_commands(tmp_path):
    spec = tmp_path / "spec.json"
    assert launch_command(spec, 1, True) == [sys.executable, "-m", "synthtune.stages._train_child", str(spec)]
    ddp = launch_command(spec, 4, False)
    assert ddp[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "4"] and "--multi_gpu" in ddp
    fsdp = launch_command(spec, 8, True)
    assert "--use_fsdp" in fsdp and fsdp[fsdp.index("--fsdp_sharding_strategy") + 1] == "FULL_SHARD"
    assert fsdp[-3:] == ["-m", "synthtune.stages._train_child", str(spec)]


def test_peft_must_find_the_target_modules(demo_cfg):
    base, lora = param_counts(demo_cfg)
    assert base > lora > 0
    bad = demo_cfg.model_copy(update={"train": demo_cfg.train.model_copy(
        update={"lora": demo_cfg.train.lora.model_copy(update={"target_modules": ["no_such_proj"]})})})
    with pytest.raises(ValueError, match=r"train.lora.target_modules=\['no_such_proj'\]"):
        param_counts(bad)


# ---------------------------------------------------------------- integration



@pytest.mark.integration
def test_lora_sft_in_a_child_process(demo_run):
    cfg, refs = demo_run
    ref = refs["train"]
    _check_trained(ref)
    assert ref.summary["quantization"] == "none" and ref.summary["resumed_from_step"] == 0
    assert ref.summary["tokens_per_s"] > 0 and ref.summary["step_time_s"] > 0
    card = open(f"{ref.uri}/adapter/README.md").read()
    assert "base_model: tiny:student" in card and refs["template"].key in card

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve(cfg.student), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, f"{ref.uri}/adapter")
    lora = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # B starts at zero: non-zero means it learned


@pytest.mark.integration
def test_qlora_nf4_path_on_cpu(demo_run):
    """Real bitsandbytes 4-bit on CPU, with the Linear4bit avx512bf16 fix applied to every layer."""
    cfg, refs = demo_run
    ref = train.run(_with_train(cfg, quantization="nf4", epochs=10.0, merge=True), ArtifactStore(cfg.artifact_root),
                    {"template": refs["template"]})
    _check_trained(ref)
    assert ref.summary["quantization"] == "nf4"
    assert ref.summary["cpu_4bit_layers_fixed"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert ref.summary["activation_checkpointing"] is False  # on CPU memory never asks for it

    # the merged export: the adapter folded into the unquantized base, loadable on its own
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve

    merged = AutoModelForCausalLM.from_pretrained(f"{ref.uri}/merged")
    base = AutoModelForCausalLM.from_pretrained(resolve(cfg.student))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not merged.state_dict()[name].equal(base.state_dict()[name])


@pytest.mark.integration
def test_dpo_on_learnable_preference_pairs(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    templated = demo_preference_pairs(demo_cfg)
    cfg = _with_train(demo_cfg, mode="dpo", epochs=10.0, learning_rate=0.005, beta=1.0, logging_steps=4)
    ref = train.run(cfg, store, {"template": templated})
    _check_trained(ref)
    assert ref.summary["mode"] == "dpo"
    logged = [h for h in json.loads(open(f"{ref.uri}/loss_history.json").read()) if "loss" in h]
    # the policy prefers chosen over rejected far more often, and by a wider margin, than at the start
    assert logged[-1]["rewards/accuracies"] >= logged[0]["rewards/accuracies"] + 0.3
    assert logged[-1]["rewards/margins"] > 3 * logged[0]["rewards/margins"] > 0


@pytest.mark.integration
def test_sft_mode_refuses_preference_rows_before_training(demo_cfg):
    store = ArtifactStore(demo_cfg.artifact_root)
    rows = [{"id": "p", "prompt": "q", "chosen": "a", "rejected": "b"}]
    pairs = produce(store, "filter", "p1", {}, {}, lambda st: pd.DataFrame(rows).to_parquet(st.path / "data.parquet"))
    with pytest.raises(ValueError, match="train.mode=sft needs SFT"):
        train.run(demo_cfg, store, {"template": template.run(demo_cfg, store, {"filter": pairs})})


@pytest.mark.integration
def test_sigkill_mid_run_then_retry_resumes_from_the_checkpoint(demo_run, tmp_path):
    cfg, refs = demo_run
    long = _with_train(cfg, max_steps=400, save_steps=20, save_total_limit=3, logging_steps=20, seed=7)
    store = ArtifactStore(cfg.artifact_root)
    k = train.key(long, {"template": refs["template"].digest})
    work = work_dir(store, k)
    script = (f"from synthtune.config import PipelineConfig; from synthtune.store import ArtifactStore, ArtifactRef\n"
              f"from synthtune.stages import train\ncfg = PipelineConfig.model_validate_json({long.model_dump_json()!r})\n"
              f"train.run(cfg, ArtifactStore(cfg.artifact_root), "
              f"{{'template': ArtifactRef.model_validate_json({refs['template'].model_dump_json()!r})}})\n")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while latest_valid_checkpoint(work / "checkpoints") is None and time.time() < deadline:
        time.sleep(0.2)
    killed_at = latest_valid_checkpoint(work / "checkpoints")
    assert killed_at is not None, "no checkpoint appeared"
    children = subprocess.run(["pgrep", "-f", f"synthtune.stages._train_child {work}"], capture_output=True, text=True)
    os.killpg(parent.pid, signal.SIGKILL)  # the stage process dies hard; its training child must follow
    parent.wait()
    time.sleep(1.0)
    for pid in children.stdout.split():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), \
            f"training child {pid} outlived its parent"
    assert store.ref("train", k) is None  # nothing committed

    ref = train.run(long, store, {"template": refs["template"]})  # the retry
    resumed = ref.summary["resumed_from_step"]
    assert resumed >= int(killed_at.name.split("-")[1]) > 0 and ref.summary["steps"] == 400
    assert ref.summary["first_step_this_run"] == resumed + 1  # continued from the checkpoint, not from 0

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve(cfg.student), dtype=torch.float32),
                              f"{ref.uri}/adapter")
    assert not work.exists()  # checkpoints dropped once the adapter is committed
    assert not work.parent.exists() or any(work.parent.iterdir())  # `.work` goes with its last run's folder


@pytest.mark.integration
def test_out_of_memory_halves_the_micro_batch(demo_run, monkeypatch, tmp_path):
    cfg, refs = demo_run
    inject(monkeypatch, tmp_path / "site", OOM_ABOVE_BATCH.format(n=2))  # the child behaves as if CUDA ran out
    ref = train.run(_with_train(cfg, epochs=2.0, seed=3), ArtifactStore(cfg.artifact_root), {"template": refs["template"]})
    assert (ref.summary["micro_batch"], ref.summary["gradient_accumulation_steps"]) == (2, 4)


@pytest.mark.integration
def test_disk_preflight_refuses_on_a_small_filesystem(demo_run, tmp_path):
    cfg, refs = demo_run
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        small = _with_train(cfg, merge=True).model_copy(update={"artifact_root": str(mount / "artifacts")})
        store = ArtifactStore(small.artifact_root)
        tpl = produce(store, "template", refs["template"].key, {}, {}, lambda st: (st.path / "data.parquet").write_bytes(
            open(f"{refs['template'].uri}/data.parquet", "rb").read()))
        with pytest.raises(RuntimeError, match=r"not enough disk at .*training needs about [\d.]+ MiB \(checkpoints .*"
                                               r"merged [\d.]+ MiB.*only [\d.]+ MiB is free"):
            train.run(small, store, {"template": tpl})
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_micro_batch_from_the_memory_estimate_keeps_the_effective_batch():
    from synthtune.stages.train import choose_micro_batch

    gib = 2**30
    # plenty of room: the whole effective batch in one micro-batch, no checkpointing
    plan = choose_micro_batch(10 * gib, 1 * gib, 0.1 * gib, 40 * gib, effective_batch=16)
    assert (plan.micro_batch, plan.gradient_accumulation_steps, plan.activation_checkpointing) == (16, 1, False)
    # 30 GiB over the fixed 10: the largest divisor of 16 whose activations fit is 4 (6 would not divide)
    plan = choose_micro_batch(10 * gib, 6 * gib, 0.5 * gib, 40 * gib, effective_batch=16)
    assert (plan.micro_batch, plan.gradient_accumulation_steps, plan.activation_checkpointing) == (4, 4, False)
    assert plan.estimate_gib == pytest.approx(34.0)
    # not even one row without checkpointing: checkpoint, and batch up again
    plan = choose_micro_batch(10 * gib, 40 * gib, 2 * gib, 40 * gib, effective_batch=12)
    assert (plan.micro_batch, plan.gradient_accumulation_steps, plan.activation_checkpointing) == (12, 1, True)
    with pytest.raises(RuntimeError, match="even at micro-batch 1 with activation checkpointing"):
        choose_micro_batch(39 * gib, 40 * gib, 2 * gib, 40 * gib, effective_batch=8)


def test_memory_plan_on_cpu_is_the_configured_batch(demo_cfg):
    from synthtune.stages.train import plan_gpu_memory

    plan = plan_gpu_memory(10**6, 10**4, 64, 2, False, demo_cfg.train, 96)
    assert (plan.micro_batch, plan.gradient_accumulation_steps, plan.activation_checkpointing) == (
        demo_cfg.train.batch_size, demo_cfg.train.gradient_accumulation_steps, False)
