"""Model identity for cache keys, and loading helpers shared by stages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from synthtune import tiny
from synthtune.artifacts import sha256_file

_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "adapter_config.json")


def fingerprint(spec: str) -> str:
    """What identifies a model in a cache key.

    `tiny:*` names carry their recipe hash; a local folder is its small files' contents plus the
    names and sizes of its weight files (hashing 16 GB of weights every run would cost minutes);
    a Hub id is the id plus the contents of its small files when they are in the local HF cache.
    """
    if spec.startswith("tiny:"):
        return tiny.tiny_path(spec.removeprefix("tiny:")).name
    path = Path(spec).expanduser()
    if path.is_dir():
        parts = {}
        for p in sorted(path.iterdir()):
            if p.name in _SMALL_FILES:
                parts[p.name] = sha256_file(p)
            elif p.suffix in (".safetensors", ".bin", ".gguf"):
                parts[p.name] = p.stat().st_size
        return "dir:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    # a Hub id: its cached small files when present (tokenizer and chat template contents), else the id
    from huggingface_hub import try_to_load_from_cache

    parts = {}
    for name in _SMALL_FILES:
        try:
            hit = try_to_load_from_cache(spec, name)
        except Exception:  # not a valid repo id: the id alone identifies it
            break
        if isinstance(hit, str):
            parts[name] = sha256_file(hit)
    if parts:
        return "hub:" + spec + ":" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return "hub:" + spec


def identity(spec: str, kind: str = "transformers", base_url: str | None = None) -> str:
    """What a model is, for a cache key: a local or Hub model's contents, or the endpoint and the
    model name an OpenAI-compatible server knows."""
    return fingerprint(spec) if kind == "transformers" else f"openai:{base_url}:{spec}"


def resolve(spec: str) -> str:
    """What `from_pretrained` takes for a model spec (builds `tiny:*` models on first use)."""
    return tiny.resolve_model(spec)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(spec))


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text (no special tokens), in one batch through the fast tokenizer's backend
    when there is one (no Python lists of ids built: ~2x faster on a million rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
