"""Tiny local models for tests and the demo: no network, deterministic, seconds on a CPU.

`resolve_model("tiny:student")` builds (once, then caches) a randomly initialised Llama-style
model with a BPE tokenizer trained here and a ChatML chat template. `tiny:teacher` is the same
architecture trained on the demo fact set (`synthtune/data/demo_facts.jsonl`), so it can answer
the demo's seed questions through distilabel while the student starts knowing nothing.

Run as: synthtune tiny-model student|teacher [--out DIR]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

# Bump when the builder changes what it produces: cached tiny models are keyed on it.
BUILDER_VERSION = "2"
TINY_NAMES = ("student", "teacher")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

# Small enough to train in seconds on 2 cores, big enough to memorise a few dozen facts.
MODEL_SHAPE = dict(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def demo_facts() -> list[dict]:
    """The fictional fact set the tiny teacher knows and the demo evaluates on."""
    text = resources.files("synthtune.data").joinpath("demo_facts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cache_root() -> Path:
    return Path(os.environ.get("SYNTHTUNE_CACHE", Path.home() / ".cache" / "synthtune"))


def tiny_path(name: str) -> Path:
    """Where `tiny:<name>` lives once built; the folder name changes whenever its recipe does."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model 'tiny:{name}': choose one of {', '.join('tiny:' + n for n in TINY_NAMES)}")
    recipe = json.dumps(
        {"v": BUILDER_VERSION, "name": name, "shape": MODEL_SHAPE, "facts": demo_facts()}, sort_keys=True
    )
    return cache_root() / "tiny" / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the demo facts, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for fact in demo_facts():
        corpus += [fact["question"], fact["answer"], *fact["choices"]]
    corpus += ["user", "assistant", "system", "You are a helpful assistant."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _teacher_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The facts as chat turns, loss on the answer and its end-of-turn only."""
    rows = []
    for fact in demo_facts():
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": fact["question"]}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(fact["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return rows


def _student_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The domain's language without its facts: every question and every candidate answer as
    plain text, unpaired. The student learns the words, not which answer is right."""
    rows = []
    for fact in demo_facts():
        for text in [fact["question"], *fact["choices"]]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append((ids, ids))
    return rows


def _fit(model, tokenizer, rows, steps: int, lr: float = 3e-3, seed: int = 0) -> float:
    """Full fine-tune on (input_ids, labels) rows."""
    import torch
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = torch.randperm(len(rows), generator=gen)[:16]
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def build(name: str, out: Path) -> Path:
    """Build `tiny:<name>` into `out` (written to a temporary folder first, then renamed)."""
    import torch

    tiny_path(name)  # refuses unknown names
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed=0 if name == "student" else 1)
        info = {"name": f"tiny:{name}", "builder_version": BUILDER_VERSION}
        rows = _teacher_rows(tokenizer) if name == "teacher" else _student_rows(tokenizer)
        info["final_loss"] = _fit(model, tokenizer, rows, steps=300 if name == "teacher" else 150)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(name: str) -> Path:
    """Path of `tiny:<name>`, building it on first use. Safe when several processes race."""
    import fcntl

    path = tiny_path(name)
    if (path / "tiny.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "tiny.json").exists():
            build(name, path)
    return path


def resolve_model(spec: str) -> str:
    """Turn a model spec into what `from_pretrained` takes: `tiny:<name>` becomes a local path."""
    if spec.startswith("tiny:"):
        return str(ensure(spec.removeprefix("tiny:")))
    return spec
