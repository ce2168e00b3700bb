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


def resolve(spec: str) -> str:
    """What `from_pretrained` takes for a model spec (builds `tiny:*` models on first use)."""
    return tiny.resolve_model(spec)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(spec))
