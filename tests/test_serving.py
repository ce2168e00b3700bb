"""Adapters serve the way they evaluated: LoRA-only tensors, a template and an end-of-turn that
stops generation, a merged export with the adapter's greedy tokens, a model card the Hub reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from synthtune import cards, serving
from synthtune.stages import train
from synthtune.store import ArtifactStore
from tests.support.faults import MERGE_DTYPE, inject


def _adapter(folder: Path, tensors: dict, **config) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: torch.zeros(2, 2) for k in tensors}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, **config}))
    return folder


def test_a_plain_lora_adapter_is_ready_for_a_lora_server(tmp_path):
    keys = [f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight" for m in ("q_proj", "v_proj")
            for ab in "AB"]
    got = serving.inspect_adapter(_adapter(tmp_path / "a", keys), 1000, 1000)
    assert got["lora_only"] and got["modules"] == ["q_proj", "v_proj"] and got["problems"] == []


def test_what_a_lora_server_refuses_is_named(tmp_path):
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight",
            "base_model.model.model.embed_tokens.modules_to_save.weight"]
    got = serving.inspect_adapter(_adapter(tmp_path / "a", keys, modules_to_save=["embed_tokens"], use_dora=True),
                                  1000, 1003)
    text = " | ".join(got["problems"])
    assert not got["lora_only"] and got["added_tokens"] == 3
    assert "1 tensors besides LoRA's (e.g. base_model.model.model.embed_tokens.modules_to_save.weight)" in text
    assert "modules_to_save ['embed_tokens']" in text and "LoRA on ['lm_head']" in text
    assert "DoRA" in text and "adds 3 tokens to the base's 1000" in text


def test_the_end_of_turn_of_the_template_must_stop_generation(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ok = serving.check_stops(tiny_tokenizer, [im_end])
    assert ok["chat_template"] and ok["end_of_turn"] == "<|im_end|>" and ok["stops"] and ok["problems"] == []
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.eos_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.pad_token
    bad = serving.check_stops(tok, [])
    if tok.eos_token_id != im_end:
        assert not bad["stops"] and "a reply ends with <|im_end|>" in bad["problems"][0]
    tok.chat_template = None
    assert serving.check_stops(tok, [])["problems"][0].startswith("the tokenizer saved with the adapter has no chat")


def test_a_card_is_hub_metadata_and_gains_its_evaluation(demo_cfg):
    metrics = {"steps": 10, "first_loss": 2.0, "last_loss": 1.0, "quantization": "none", "device": "cpu",
               "serving": {"adapter": {"lora_only": True, "modules": ["q_proj"], "added_tokens": 0, "problems": []},
                           "stops": {"chat_template": True, "end_of_turn": "<|im_end|>", "stops": True,
                                     "problems": []},
                           "merge_parity": {"prompts": 4, "identical": 4}}}
    card = cards.train_card(demo_cfg, "k1", {"template": "t", "filter": "f", "generate": "g"}, metrics,
                            "name: demo\n")
    meta, title, sections = cards.parse(card)
    assert meta["base_model"] == "tiny:student" and meta["library_name"] == "peft"
    assert meta["datasets"] == ["synthtune:template/t", "synthtune:filter/f", "synthtune:generate/g"]
    assert list(sections) == ["Training", "Serving checks", "Evaluation", "Reproduce"]
    assert sections["Evaluation"] == cards.PENDING and "```yaml\nname: demo\n```" in sections["Reproduce"]
    rows = [{"task": "demo_facts", "metric": "acc", "base": 0.3, "tuned": 0.9, "delta": 0.6}]
    done = cards.with_evaluation(card, "demo", rows, True, ["target ok"])
    meta, _, sections = cards.parse(done)
    assert "| demo_facts | acc | 0.3000 | 0.9000 | 0.6000 |" in sections["Evaluation"]
    assert "**Promoted**" in sections["Evaluation"]
    assert meta["model-index"][0]["results"][0]["metrics"] == [{"type": "acc", "name": "acc", "value": 0.9}]


@pytest.mark.integration
def test_the_demo_adapter_is_checked_and_its_card_completed_by_promote(demo_run):
    cfg, refs = demo_run
    s = refs["train"].summary["serving"]
    assert s["adapter"]["lora_only"] and s["adapter"]["added_tokens"] == 0 and not s["adapter"]["problems"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == set(s["adapter"]["modules"])
    assert s["stops"]["end_of_turn"] == "<|im_end|>" and s["stops"]["stops"] and s["merge_parity"] is None
    store = ArtifactStore(cfg.artifact_root)
    meta, _, sections = cards.parse(Path(refs["train"].uri, "adapter", "README.md").read_text())
    assert "| demo_facts | acc |" in sections["Evaluation"] and "Promoted" in sections["Evaluation"]
    assert meta["model-index"][0]["name"] == "demo"
    assert f"synthtune:template/{refs['template'].key}" in meta["datasets"]
    assert yaml.safe_load(sections["Reproduce"].split("```yaml\n")[1].split("```")[0])["train"]["epochs"] == 60
    assert store.problems("train", refs["train"].key) == []  # the annotated card is in the manifest
    assert s["template"] == {"same_as_training": True, "problems": []}  # the saved template renders as trained


@pytest.mark.integration
def test_chat_answers_with_the_champion_adapter(demo_run):
    """`synthtune chat`: base + the champion's adapter, prompted with the template saved with it."""
    from typer.testing import CliRunner

    from synthtune.cli import app
    from synthtune.tiny import demo_facts
    from tests.conftest import DEMO

    cfg, _ = demo_run
    # what the adapter learned to say: sentences in the facts' words (the random base writes token soup)
    words = {w for f in demo_facts() for w in f["answer"].replace(".", " .").split()}

    def learned(reply: str) -> bool:
        return bool(reply) and reply.endswith(".") and set(reply.replace(".", " .").split()) <= words

    args = ["chat", str(DEMO), f"artifact_root={cfg.artifact_root}"]
    once = CliRunner().invoke(app, [*args, "--prompt", "What is the capital of Vardon?"])
    assert once.exit_code == 0, once.output
    lines = once.stdout.splitlines()
    assert lines[0] == "> What is the capital of Vardon?" and learned(lines[1]), once.output  # no loading bars
    asked = "".join(f"{f['question']}\n" for f in demo_facts()[1:3])
    loop = CliRunner().invoke(app, args, input=asked + "\n")  # interactive: one per line until an empty line
    replies = [line for line in loop.stdout.splitlines() if line and not line.startswith(">")]
    assert loop.exit_code == 0 and len(replies) == 2 and all(map(learned, replies)), loop.output
    missing = CliRunner().invoke(app, [*args, "--adapter", "nope", "--prompt", "hi"])
    assert missing.exit_code == 1 and "chat: adapter nope: no finished train output" in missing.output


@pytest.mark.integration
@pytest.mark.parametrize("wrong_dtype", [None, pytest.param("float8_e4m3fn", marks=pytest.mark.drill)])
def test_a_merged_export_must_generate_what_the_adapter_generates(demo_run, tmp_path, monkeypatch, wrong_dtype):
    cfg, refs = demo_run
    root = tmp_path / "root"
    shutil.copytree(Path(refs["template"].uri), root / "template" / refs["template"].key)
    store = ArtifactStore(str(root))
    merged_cfg = cfg.model_copy(update={"artifact_root": str(root),
                                        "train": cfg.train.model_copy(update={"merge": True})})
    if wrong_dtype:
        inject(monkeypatch, tmp_path / "site", MERGE_DTYPE.format(dtype=wrong_dtype))
        with pytest.raises(serving.ServingError, match=r"merge parity failed: for the prompt '.*' the adapter and the "
                                                       r"merged export differ from generated token \d+"):
            train.run(merged_cfg, store, {"template": refs["template"]})
        trained = store.manifest("train", train.key(merged_cfg, {"template": refs["template"].digest}))
        assert not [f for f in (trained or {}).get("files", {}) if f.startswith("merged/")]  # never committed
        return
    ref = train.run(merged_cfg, store, {"template": refs["template"]})
    parity = ref.summary["serving"]["merge_parity"]
    assert parity["prompts"] == parity["identical"] == 8 and parity["new_tokens"] > 0
    generation = json.loads(Path(ref.uri, "merged", "generation_config.json").read_text())
    im_end = refs["train"].summary["serving"]["stops"]["end_of_turn_id"]
    eos = generation["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])  # the export stops at the end of a reply
    assert "identical to the adapter's on 8 held prompts" in Path(ref.uri, "adapter", "README.md").read_text()
