"""Where a night's training starts, and which rows it reads (`train.init`, `train.data`).

A continued night (`init: champion`) loads the adapter in service as trainable weights and trains it
further; with `data: new` it reads only the rows that adapter never trained on (a row is its seed id
and the hash of its token ids, so an edited seed counts as new) plus a replay sample of the rows it
did train on, drawn from the whole history and seeded by the night's train key (a retry reads the
same rows). Every adapter records the rows it and its ancestors trained on (`trained.parquet`: seed
id and row hash, one row each), so the next night knows what is new.

With no champion yet (the first night, or after a gc) the night starts from base and says so; every
`rebase_every`-th generation of a chain starts from base on all rows again, so drift from a long chain
of continuations stays bounded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from synthtune.registry import Registry, RegistryError
from synthtune.store import ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

TRAINED = "trained.parquet"  # in every train output: (id, row_hash) of every row the adapter's chain trained on


@dataclass(frozen=True)
class Start:
    """Where a night's training starts: the parent adapter's train output (None: from base), and why."""

    parent: ArtifactRef | None
    why: str
    depth: int  # continuations since the chain last started from base (0: this night starts from base)


def depth(store: ArtifactStore, train_key: str) -> int:
    """How many continued generations lead from base to `train_key` (0: it was trained from base)."""
    n, key = 0, train_key
    while (manifest := store.manifest("train", key)) is not None and manifest.get("init", "base") != "base":
        n, key = n + 1, manifest["init"]
    return n


def chain(store: ArtifactStore, train_key: str) -> list[dict]:
    """The adapters from `train_key` back to the one trained from base, newest first: each one's key,
    when it was made, and the rows it trained on ({trained, new, replay}); an ancestor removed by gc ends
    the chain with `gone` set."""
    out, key = [], train_key
    while key != "base":
        manifest = store.manifest("train", key)
        if manifest is None:
            out.append({"key": key, "gone": True})
            break
        out.append({"key": key, "created_at": manifest.get("created_at"), "rows": manifest.get("rows", {}),
                    "init": manifest.get("init", "base")})
        key = manifest.get("init", "base")
    return out


def start(cfg: PipelineConfig, store: ArtifactStore, template_key: str | None = None) -> Start:
    """Where tonight's training starts (what the runner gives the train step as its `parent` input).

    When the champion was trained on tonight's very rows (`template_key`), tonight's training is the
    champion itself (a rerun of a promoted night): it starts where the champion started, so its key,
    and every cached step after it, stay the same."""
    tc = cfg.train
    if tc.init == "base":
        return Start(None, "from base (train.init: base)", 0)
    registry = Registry(store, cfg.name)
    champion = registry.champion()
    if champion is None:
        return Start(None, "from base: no champion yet to continue", 0)
    key = champion["train_key"]
    manifest = store.manifest("train", key)
    if manifest is None or store.problems("train", key):
        raise RegistryError(f"train.init: champion, but the champion {key} ({registry.uri('champion.json')}) has no "
                            f"intact adapter at {registry.adapter_uri(champion)}: restore it, `synthtune rollback "
                            "--to TRAIN_KEY` to another, or train from base (train.init=base)")
    if template_key is not None and (manifest.get("upstream") or {}).get("template") == template_key:
        key = manifest.get("init", "base")  # tonight is the champion's own night: start where it started
        if key == "base" or store.ref("train", key) is None:
            return Start(None, "from base, as the champion trained on tonight's rows did", 0)
    generation = depth(store, key) + 1
    if tc.rebase_every and generation >= tc.rebase_every:
        return Start(None, f"from base on all rows: a rebase night (train.rebase_every: {tc.rebase_every}; {key} is "
                           f"adapter {generation} of its chain)", 0)
    return Start(store.ref("train", key), f"continues {key} (adapter {generation + 1} of its chain)", generation)


SHAPE = ("r", "alpha", "target_modules", "use_dora", "use_rslora")


def check_shape(cfg: PipelineConfig, store: ArtifactStore, parent_key: str) -> None:
    """A continued night needs the parent adapter's LoRA shape and base model: raises ValueError naming
    the field and the parent's value (before any GPU time; there is no silent fallback to base)."""
    from synthtune.keys import key_payload

    manifest = store.manifest("train", parent_key) or {}
    theirs, ours = (manifest.get("config") or {}).get("lora") or {}, key_payload(cfg.train)["lora"]
    for name in SHAPE:
        if name in theirs and theirs[name] != ours[name]:
            raise ValueError(f"train.lora.{name} is {ours[name]!r}, but the champion {parent_key} that train.init: "
                             f"champion continues has {name} {theirs[name]!r}: set train.lora.{name}: "
                             f"{theirs[name]!r}, or train.init: base for a new adapter")
    student = manifest.get("student") or next(
        (r.get("student") for r in Registry(store, cfg.name).promoted() if r.get("train_key") == parent_key), None)
    if student and student != cfg.student:
        raise ValueError(f"student is {cfg.student!r}, but the champion {parent_key} that train.init: champion "
                         f"continues was trained on {student!r}: set student: {student}, or train.init: base")


def trained_rows(store: ArtifactStore, train_key: str) -> set[tuple[str, str]]:
    """(seed id, row hash) of every row `train_key`'s chain trained on (its `trained.parquet`)."""
    import pyarrow.parquet as pq

    with store.fs.open(store.path("train", train_key, TRAINED), "rb") as f:
        table = pq.read_table(f)
    return set(zip(table["id"].to_pylist(), table["row_hash"].to_pylist(), strict=True))


def row_hashes(rows) -> list[str]:
    """A stable hash of each templated row's token ids (what is trained, not its seed id)."""
    columns = [c for c in ("input_ids", "assistant_masks", "prompt_ids", "chosen_ids", "rejected_ids") if c in rows]
    return [hashlib.sha256(json.dumps([list(map(int, rows[c][i])) for c in columns]).encode()).hexdigest()[:24]
            for i in range(len(rows))]


def select(rows, trained: set[tuple[str, str]] | None, replay, seed: str):
    """(the rows to train on, how many are new, how many replayed): every row when `trained` is None
    (data: all, or no parent); else the rows not in `trained` plus a replay sample of those that are
    (`replay`: a float is a share of the new rows' count, an integer a number of rows), drawn with a
    generator seeded by `seed`."""
    import numpy as np

    hashes = row_hashes(rows)
    keys = list(zip(rows["id"].astype(str), hashes, strict=True))
    if trained is None:
        return rows.assign(row_hash=hashes), len(rows), 0
    new = [i for i, k in enumerate(keys) if k not in trained]
    old = [i for i, k in enumerate(keys) if k in trained]
    want = int(replay) if isinstance(replay, int) and not isinstance(replay, bool) else round(replay * len(new))
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:16], 16))
    picked = sorted(rng.choice(old, size=min(want, len(old)), replace=False).tolist()) if old and want else []
    chosen = sorted(new + picked)
    return rows.iloc[chosen].assign(row_hash=[hashes[i] for i in chosen]).reset_index(drop=True), len(new), len(picked)
