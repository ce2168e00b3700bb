"""Synthetic corpora with planted near-duplicates, shared by the filter tests and bench/filter.py."""

from __future__ import annotations

import random

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ra", "no", "vi", "pe", "do", "gu", "fa")
         for b in ("rn", "sk", "lt", "mp", "nd", "ve", "ro", "ta", "li", "ce", "bu", "zo")]


def corpus(n_base: int, n_near: int, n_exact: int = 0, words: int = 50, edits: int = 2, seed: int = 0):
    """(rows, ids of planted near-duplicates, ids of planted exact duplicates). A near-duplicate is a
    base row with `edits` single-word substitutions, in prompt and response alike."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_base):
        text = [rng.choice(VOCAB) for _ in range(words)]
        rows.append({"id": f"b{i}", "prompt": " ".join(text[:12]), "response": " ".join(text[12:])})
    near, exact = set(), set()
    for i in range(n_near):
        src = rows[rng.randrange(n_base)]  # not rng.choice(rows[:n_base]): that copies the list every time
        text = (src["prompt"] + " " + src["response"]).split()
        for _ in range(edits):
            text[rng.randrange(len(text))] = rng.choice(VOCAB)
        rows.append({"id": f"n{i}", "prompt": " ".join(text[:12]), "response": " ".join(text[12:])})
        near.add(f"n{i}")
    for i in range(n_exact):
        src = rows[rng.randrange(n_base)]  # not rng.choice(rows[:n_base]): that copies the list every time
        rows.append({**src, "id": f"e{i}"})
        exact.add(f"e{i}")
    rng.shuffle(rows)
    return rows, near, exact
