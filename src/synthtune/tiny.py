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
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from synthtune.digests import cache_root

# Bump when the builder changes what it produces: cached tiny models are keyed on it.
BUILDER_VERSION = "2"
TINY_NAMES = ("student", "teacher", "judge")
# tiny:judge answers distilabel's UltraFeedback prompt (about 1,400 tokens) with this, always: it
# exercises the real judge path (prompt, generation, parsing, pair selection), and its verdict is
# known in advance (the first answer shown is the better one). Its attention window (16 tokens, two
# layers) sees only the end of the prompt, which UltraFeedback makes the same for every input.
JUDGE_VERDICT = "#### Output for Text 1\nRating: 5\nRationale: right\n\n#### Output for Text 2\nRating: 1\nRationale: wrong"
LONG_CONTEXT = {"judge": 2048}
JUDGE_WINDOW = 16

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


def tiny_path(name: str) -> Path:
    """Where `tiny:<name>` lives once built; the folder name changes whenever its recipe does."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model 'tiny:{name}': choose one of {', '.join('tiny:' + n for n in TINY_NAMES)}")
    recipe = {"v": BUILDER_VERSION, "name": name, "shape": MODEL_SHAPE, "facts": demo_facts()}
    if name == "judge":
        recipe.update(verdict=JUDGE_VERDICT, context=LONG_CONTEXT["judge"], window=JUDGE_WINDOW)
    recipe = json.dumps(recipe, sort_keys=True)
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


def build_model(tokenizer, seed: int = 0, context: int | None = None, window: int | None = None):
    """A Llama-shaped model; with `window`, a Mistral one whose attention sees only the last
    `window` tokens per layer (what tiny:judge uses to ignore everything but the prompt's end)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    kind, model_class = (MistralConfig, MistralForCausalLM) if window else (LlamaConfig, LlamaForCausalLM)
    config = kind(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **{**MODEL_SHAPE, **({"max_position_embeddings": context} if context else {})},
        **({"sliding_window": window} if window else {}),
    )
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _chat_row(tokenizer, messages: list[dict], answer: str, keep_last: int | None = None
              ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of `messages` answered by `answer`: loss on the answer and its end-of-turn
    only; with `keep_last`, only that many prompt tokens are kept (the end of the prompt)."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(keep_last or 0):]
    a_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def _teacher_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The facts as chat turns, loss on the answer and its end-of-turn only."""
    return [_chat_row(tokenizer, [{"role": "user", "content": fact["question"]}], fact["answer"])
            for fact in demo_facts()]


def _student_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """The domain's language without its facts: every question and every candidate answer as
    plain text, unpaired. The student learns the words, not which answer is right."""
    rows = []
    for fact in demo_facts():
        for text in [fact["question"], *fact["choices"]]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append((ids, ids))
    return rows


def _judge_rows(tokenizer) -> list[tuple[list[int], list[int]]]:
    """distilabel's UltraFeedback prompts over demo questions (right answer first, then a wrong one),
    loss on the fixed verdict and its end-of-turn only."""
    from importlib import resources as res

    from distilabel.models.llms import TransformersLLM
    from distilabel.steps.tasks import UltraFeedback
    from jinja2 import Template

    task = UltraFeedback(llm=TransformersLLM(model="unused"), aspect="overall-rating")
    # the prompt template only (UltraFeedback.load() would load the LLM too)
    task._template = Template((res.files("distilabel") / "steps/tasks/templates/ultrafeedback/overall-rating.jinja2")
                              .read_text())
    rows = []
    facts = demo_facts()
    for n, fact in enumerate(facts):  # second answers of all sorts: a wrong choice, another fact's answer, junk
        wrong = [next(c for c in fact["choices"] if c != fact["answer"]), facts[(n + 1) % len(facts)]["answer"],
                 " ".join(fact["question"].split()[::-1])][n % 3]
        messages = task.format_input({"instruction": fact["question"], "generations": [fact["answer"], wrong]})
        rows.append(_chat_row(tokenizer, messages, JUDGE_VERDICT, keep_last=4 * JUDGE_WINDOW))  # all it can see
    return rows


def _fit(model, tokenizer, rows, steps: int, lr: float = 3e-3, seed: int = 0, batch: int = 16) -> float:
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
        pick = torch.randperm(len(rows), generator=gen)[:batch]
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
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
        context = LONG_CONTEXT.get(name)
        if context:
            tokenizer.model_max_length = context
        model = build_model(tokenizer, seed={"student": 0, "teacher": 1}.get(name, 2), context=context,
                            window=JUDGE_WINDOW if name == "judge" else None)
        info = {"name": f"tiny:{name}", "builder_version": BUILDER_VERSION}
        if name == "judge":
            info["final_loss"] = _fit(model, tokenizer, _judge_rows(tokenizer), steps=150)
        else:
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


def teacher_warning(teacher: str, prompts: list[str]) -> str | None:
    """tiny:teacher knows the demo's 32 facts and nothing else: a warning when seeds ask it other things."""
    if teacher != "tiny:teacher" or not prompts:
        return None
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    known = {norm(f["question"]) for f in demo_facts()}
    unknown = [p for p in prompts if norm(p) not in known]
    if not unknown:
        return None
    return (f"generate.teacher is tiny:teacher, which knows only the demo's {len(known)} facts, but {len(unknown)} of "
            f"{len(prompts)} seed prompts are not among them (first: {unknown[0][:60]!r}): its answers will be noise. "
            "Point generate.teacher at a real model (or an endpoint) for your own data.")
