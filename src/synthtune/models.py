"""Model identity for cache keys, and loading helpers shared by stages.

A cache key promises that the same key means the same output, so a model's identity must change
whenever what it computes can: a local folder is keyed by the contents of every file in it
(weights included; each file's digest is remembered per path, size and mtime, so a 16 GB model is
read once), a Hub id by the commit its revision points to in the local Hugging Face cache (and the
revision itself when the cache does not know it). `*_revision` fields pin a Hub revision; they are
passed to every `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from synthtune import tiny
from synthtune.digests import file_sha256, folder_sha256

_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "adapter_config.json")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def _short(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def folder_fingerprint(path: Path) -> str:
    """The contents of every file below a local model folder (hidden files and folders aside)."""
    return "dir:" + folder_sha256(path)[:16]


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision points to, from the local Hugging Face cache (None when unknown)."""
    if revision and _SHA.match(revision):
        return revision
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / (
            revision or "main")
        sha = ref.read_text().strip() if ref.is_file() else None
    except (OSError, ValueError):
        return None
    return sha if sha and _SHA.match(sha) else None


def fingerprint(spec: str, revision: str | None = None) -> str:
    """What identifies a model in a cache key (see the module docstring)."""
    pinned = f"@{revision}" if revision else ""  # a pin is in the key whatever the model is
    if spec.startswith("tiny:"):
        return tiny.tiny_path(spec.removeprefix("tiny:")).name + pinned
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_fingerprint(path) + pinned
    from huggingface_hub import try_to_load_from_cache

    commit = hub_commit(spec, revision)
    parts = {}
    for name in _SMALL_FILES:
        try:
            hit = try_to_load_from_cache(spec, name, revision=commit or revision)
        except Exception:  # not a valid repo id: the id alone identifies it
            break
        if isinstance(hit, str):
            parts[name] = file_sha256(hit)
    ident = f"hub:{spec}@{revision or 'main'}" + (f"={commit}" if commit else "")
    return ident + (f":{_short(parts)}" if parts else "")


def identity(spec: str, kind: str = "transformers", base_url: str | None = None, revision: str | None = None) -> str:
    """What a model is, for a cache key: a local or Hub model's contents, or the endpoint and the
    model name an OpenAI-compatible server knows."""
    return fingerprint(spec, revision) if kind == "transformers" else f"openai:{base_url}:{spec}"


def resolve(spec: str) -> str:
    """What `from_pretrained` takes for a model spec (builds `tiny:*` models on first use)."""
    return tiny.resolve_model(spec)


def revision_kw(revision: str | None) -> dict:
    """`from_pretrained` keyword arguments for a pinned revision (none when unpinned)."""
    return {"revision": revision} if revision else {}


def load_tokenizer(spec: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(spec), **revision_kw(revision))


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text (no special tokens), in one batch through the fast tokenizer's backend
    when there is one (no Python lists of ids built: ~2x faster on a million rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
