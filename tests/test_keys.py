"""Cache keys that are right for real models and mixed hardware: what a setting resolves to on this
machine, what a model's files hold, which revision it is, which library versions made the output."""

from __future__ import annotations

import os

import pytest

from synthtune import versions
from synthtune.models import fingerprint
from synthtune.runner import plan


def _train(cfg, **update):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def test_quantization_is_keyed_by_what_it_resolves_to(demo_cfg):
    import torch

    assert not torch.cuda.is_available()  # this box: `auto` means full-precision LoRA
    auto, nf4, none = (plan(_train(demo_cfg, quantization=q))["train"] for q in ("auto", "nf4", "none"))
    assert auto != nf4  # a CPU box's fp32 LoRA and a GPU box's QLoRA never share a key
    assert auto == none  # the same work, the same key
    # packing and liger left empty resolve to off here: the same as asking for off
    assert plan(_train(demo_cfg, packing=None, liger=None))["train"] == plan(_train(demo_cfg, packing=False,
                                                                                      liger=False))["train"]


def test_a_gpu_runtime_is_another_train_key(demo_cfg, monkeypatch):
    import torch

    cpu = plan(demo_cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = plan(demo_cfg)
    assert gpu["train"] != cpu["train"]
    assert gpu["evaluate[base]"] != cpu["evaluate[base]"]  # lm-eval's numbers depend on device and dtype too
    assert gpu["template"] == cpu["template"]  # tokenizing does not


def _weights(folder, data: bytes):
    (folder / "model.safetensors").write_bytes(data)


def test_a_local_folder_is_keyed_by_every_file_s_contents(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    _weights(model, b"\x00" * 4096)
    first = fingerprint(str(model))
    assert fingerprint(str(model)) == first  # stable (and served from the digest cache)
    stat = os.stat(model / "model.safetensors")
    _weights(model, b"\x01" * 4096)  # overwritten in place, same size
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(str(model)) != first
    moved = tmp_path / "elsewhere"
    os.rename(model, moved)
    assert fingerprint(str(moved)) == fingerprint(str(moved))
    assert fingerprint(str(moved), "v2") != fingerprint(str(moved))  # a pin is in the key


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache folder as the Hub client lays it out, with one model at two commits."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--model"
    for sha, vocab in (("a" * 40, "1"), ("b" * 40, "2")):
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        (snap / "config.json").write_text('{"vocab_size": ' + vocab + "}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v1.0").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return repo


def test_a_hub_id_is_keyed_by_the_commit_its_revision_points_to(hub_cache):
    main = fingerprint("org/model")
    assert main.startswith(f"hub:org/model@main={'a' * 40}")
    pinned = fingerprint("org/model", "v1.0")
    assert pinned.startswith(f"hub:org/model@v1.0={'b' * 40}") and pinned != main
    assert fingerprint("org/model", "b" * 40).startswith(f"hub:org/model@{'b' * 40}={'b' * 40}")
    (hub_cache / "refs" / "main").write_text("b" * 40)  # main moved on: another key
    assert fingerprint("org/model") != main
    assert fingerprint("org/unknown") == "hub:org/unknown@main"  # not in the cache: the name and revision


@pytest.mark.parametrize("lib, stages", [
    ("trl", {"train", "evaluate[tuned]", "promote"}),
    ("lm_eval", {"evaluate[base]", "evaluate[tuned]", "promote"}),
    ("distilabel", {"generate", "filter", "template", "train", "evaluate[tuned]", "promote"}),
    ("tokenizers", {"template", "train", "evaluate[tuned]", "promote"}),
])
def test_a_library_upgrade_reruns_exactly_its_stages_and_what_follows(demo_cfg, monkeypatch, lib, stages):
    import importlib.metadata

    before = plan(demo_cfg)
    real = importlib.metadata.version

    def installed(bump):
        return lambda name: bump(real(name)) if name == lib.replace("_", "-") else real(name)

    monkeypatch.setattr(importlib.metadata, "version", installed(lambda v: "999.0.0"))
    after = plan(demo_cfg)
    assert {s for s in before if before[s] != after[s]} == stages
    monkeypatch.setattr(importlib.metadata, "version", installed(lambda v: ".".join(v.split(".")[:2]) + ".99"))
    assert plan(demo_cfg) == before  # major.minor only: a patch release keeps every key
    assert versions.lib_version(lib) == ".".join(real(lib.replace("_", "-")).split(".")[:2])
