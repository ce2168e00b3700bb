"""Adapters that serve the way they evaluated: the checks run after training, recorded in the train
manifest (`serving`), so the three usual complaints are found before anyone deploys:

- an adapter a server refuses: tensors besides LoRA's (`modules_to_save`, trained embeddings), LoRA
  on embeddings or the LM head, DoRA magnitudes, tokens added to the vocabulary (vLLM serves plain
  LoRA on linear layers of an unchanged vocabulary);
- an exported model that never stops: the tokenizer saved with the adapter must carry the chat
  template, and the token that ends a reply in that template must be one generation stops on (the
  tokenizer's EOS or the base's generation_config); when it is not, the merged export's
  generation_config gets it, and the record says how to serve the adapter;
- an adapter, a merged export and a served model that disagree (merge dtype, template): with
  `train.merge`, greedy tokens on held prompts from the adapter and from the merged export as
  saved and loaded again must be identical; the first prompt that differs fails the stage.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# modules a LoRA server (vLLM, TGI, SGLang) does not take a LoRA delta on; names are matched on the
# last component of the module path
NOT_SERVED = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings", "norm",
              "layernorm", "ln_f")


class ServingError(RuntimeError):
    """The export would serve differently from what was evaluated; the message names the prompt."""


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [k for k in header if k != "__metadata__"]


def inspect_adapter(adapter: Path, base_vocab: int | None, vocab: int | None) -> dict:
    """What a LoRA server would make of the saved adapter: LoRA-only tensors, the modules they touch,
    added tokens; `problems` explains each thing that keeps it from serving as plain LoRA."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    keys = safetensors_keys(adapter / "adapter_model.safetensors")
    lora = [k for k in keys if ".lora_A" in k or ".lora_B" in k]
    other = [k for k in keys if k not in lora]
    modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora})
    problems = []
    if other:
        problems.append(f"{len(other)} tensors besides LoRA's (e.g. {other[0]}): modules_to_save or trained "
                        "embeddings, which LoRA servers refuse; serve the merged export instead")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: saved whole, not as LoRA")
    unserved = [m for m in modules if any(m == n or m.endswith(n) for n in NOT_SERVED)]
    if unserved:
        problems.append(f"LoRA on {unserved}: LoRA servers take deltas on linear layers only")
    if config.get("use_dora"):
        problems.append("DoRA magnitudes: vLLM does not serve DoRA adapters; serve the merged export")
    added = (vocab - base_vocab) if vocab and base_vocab and vocab > base_vocab else 0
    if added:
        problems.append(f"the tokenizer adds {added} tokens to the base's {base_vocab}: a LoRA server keeps the "
                        "base vocabulary; serve the merged export (with resized embeddings)")
    return {"lora_only": not other, "modules": modules, "tensors": len(keys), "added_tokens": added,
            "rank": config.get("r"), "alpha": config.get("lora_alpha"), "problems": problems}


def end_of_turn(tokenizer) -> tuple[int | None, str | None]:
    """The special token the chat template puts right after a reply (what generation must stop on)."""
    from synthtune.chat import ChatEncoder

    probe = [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong, synthtune here."}]
    ids, mask = ChatEncoder(tokenizer).encode(probe, "end-of-turn probe")
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if trained and trained[-1] in special:
        return trained[-1], tokenizer.convert_ids_to_tokens(trained[-1])
    return None, None


def check_stops(tokenizer, generation_eos: list[int]) -> dict:
    """The saved tokenizer has a chat template, and a reply's end-of-turn token stops generation."""
    problems = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        return {"chat_template": False, "end_of_turn": None, "stops": False,
                "problems": ["the tokenizer saved with the adapter has no chat template: a server would format "
                             "prompts differently from training"]}
    eot_id, eot = end_of_turn(tokenizer)
    stop_ids = sorted({i for i in [tokenizer.eos_token_id, *generation_eos] if i is not None})
    stops = eot_id is not None and eot_id in stop_ids
    if eot_id is None:
        problems.append("the chat template ends a reply with no special token: generation would not stop at the "
                        "end of a turn")
    elif not stops:
        problems.append(f"a reply ends with {eot} (id {eot_id}) but generation stops on {stop_ids} "
                        f"(eos {tokenizer.eos_token}): serve with stop token {eot} "
                        "(the merged export's generation_config.json has it)")
    return {"chat_template": True, "end_of_turn": eot, "end_of_turn_id": eot_id, "stop_ids": stop_ids,
            "stops": stops, "problems": problems}


def held_prompts(data: Path, mode: str, k: int) -> list[list[int]]:
    """Prompt token ids of `k` training rows spread over the data: what precedes the first trained
    token (SFT) or the prompt column (DPO)."""
    import pyarrow.parquet as pq

    table = pq.read_table(data)
    n = table.num_rows
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))}) if n else []
    out = []
    for i in picks:
        if mode == "dpo":
            out.append(list(table.column("prompt_ids")[i].as_py()))
        else:
            ids, mask = table.column("input_ids")[i].as_py(), table.column("assistant_masks")[i].as_py()
            first = next((j for j, m in enumerate(mask) if m), len(ids))
            out.append(ids[:first])
    return [p for p in out if p]


def greedy(model, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding to differ between two models)."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=stop_ids or None, pad_token_id=(stop_ids or [0])[0])
            out.append(y[0, len(ids):].tolist())
    return out


def parity(tokenizer, prompts: list[list[int]], adapter_out: list[list[int]], merged_out: list[list[int]]) -> dict:
    """Identical greedy tokens from the adapter and the merged export, or ServingError naming the first
    prompt where they differ (and the first token that does)."""
    for ids, a, m in zip(prompts, adapter_out, merged_out, strict=True):
        if a != m:
            at = next((i for i, (x, y) in enumerate(zip(a, m, strict=False)) if x != y), min(len(a), len(m)))
            raise ServingError(
                f"merge parity failed: for the prompt {tokenizer.decode(ids)!r} the adapter and the merged export "
                f"differ from generated token {at}: adapter {tokenizer.decode(a)!r}, merged {tokenizer.decode(m)!r}. "
                "The merged export would not serve what was evaluated (merge dtype?): use the adapter")
    return {"prompts": len(prompts), "identical": len(prompts), "new_tokens": sum(len(a) for a in adapter_out)}


def answer(student: str, revision: str | None, adapter: Path, prompts, max_new_tokens: int = 128,
           system: str | None = None):
    """Greedy replies of base + `adapter`, each prompt rendered with the chat template saved next to the
    adapter (the one it was trained and evaluated with) and stopped at its end-of-turn token. Yields
    (prompt, reply) one at a time, so an interactive loop can print as it goes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from synthtune.models import resolve, revision_kw

    hf_logging.disable_progress_bar()  # a chat prints answers, not loading bars
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve(student), **revision_kw(revision)),
                                      adapter).eval()
    eot, _ = end_of_turn(tokenizer)
    stops = sorted({i for i in (eot, tokenizer.eos_token_id) if i is not None})
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        [reply] = greedy(model, [ids["input_ids"][0].tolist()], stops, max_new_tokens)
        yield prompt, tokenizer.decode([t for t in reply if t not in stops], skip_special_tokens=True).strip()
