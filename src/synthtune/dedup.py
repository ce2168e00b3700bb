"""Near-duplicates (MinHash LSH on rensa's Rust sketches), benchmark decontamination, quality heuristics.

Near-duplicates: word n-gram shingles of the normalized text, MinHash digests computed in bulk by
rensa, LSH banding done on the digest matrix with numpy, and every candidate pair verified by its
estimated Jaccard similarity before a row is dropped. The first row of a cluster is kept, the
others name it in their reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)
REFUSALS = re.compile(
    r"\b(as an ai( language model)?|i('m| am) (sorry|unable)|i can(no|')t (help|assist|provide)|"
    r"i do not have the ability|i apologi[sz]e, but)\b", re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def shingles(text: str, n: int) -> set[str]:
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else {""}
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) whose S-curve midpoint (1/b)^(1/r) sits just below the threshold, so
    pairs at the threshold are found with high probability; verification removes the rest."""
    best = None
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        midpoint = (1 / bands) ** (1 / rows)
        if midpoint <= threshold * 0.9 and (best is None or rows > best[1]):
            best = (bands, rows)
    return best or (num_perm, 1)


def _band_groups(texts: list[str], threshold: float, ngram: int, num_perm: int, seed: int):
    """(MinHash digest matrix, group ids: one row per text, one column per band, -1 where no other text
    shares that band). rensa computes the digests in bulk; each band's rows fold into one 64-bit key
    (a rare collision only adds a candidate, which verification rejects), and numpy sorts each band
    to find the keys shared by two or more texts, so Python only ever looks at those."""
    import numpy as np
    from rensa import RMinHash

    matrix = RMinHash.digest_matrix_from_token_sets([sorted(shingles(t, ngram)) for t in texts], num_perm, seed)
    digests = np.asarray(matrix.to_rows(), dtype=np.uint32)
    bands, rows = lsh_bands(threshold, num_perm)
    parts = digests[:, : bands * rows].reshape(len(texts), bands, rows).astype(np.uint64)
    weights = np.array([0x9E3779B97F4A7C15 ** (k + 1) % 2**64 for k in range(rows)], dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = (parts * weights).sum(axis=2, dtype=np.uint64)
    groups = np.full(keys.shape, -1, dtype=np.int64)
    offset = 0
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")
        ordered = keys[order, b]
        starts = np.ones(len(ordered), dtype=bool)
        starts[1:] = ordered[1:] != ordered[:-1]
        group = np.cumsum(starts) - 1
        shared = np.bincount(group)[group] > 1
        groups[order[shared], b] = group[shared] + offset
        offset += int(group[-1]) + 1
    return digests, groups


def _best(digests, candidates: set[int], i: int, threshold: float) -> tuple[int, float] | None:
    """The candidate most similar to row i, if its estimated Jaccard reaches the threshold (verification)."""
    import numpy as np

    if not candidates:
        return None
    cand = np.fromiter(candidates, dtype=np.int64)
    sims = (digests[cand] == digests[i]).mean(axis=1)
    best = int(np.argmax(sims))
    return (int(cand[best]), float(sims[best])) if sims[best] >= threshold else None


def _grouped_rows(groups) -> list[tuple[int, list[int]]]:
    """(row, its shared groups) for the rows sharing any band with another row, in row order."""
    import numpy as np

    rows = np.nonzero((groups >= 0).any(axis=1))[0]
    return [(i, [g for g in gs if g >= 0]) for i, gs in zip(rows.tolist(), groups[rows].tolist(), strict=True)]


def near_duplicates(texts: list[str], threshold: float = 0.7, ngram: int = 3, num_perm: int = 128,
                    seed: int = 0) -> list[tuple[int, float] | None]:
    """For each text, (index of the earlier kept text it near-duplicates, estimated Jaccard), or None."""
    if not texts:
        return []
    digests, groups = _band_groups(texts, threshold, ngram, num_perm, seed)
    out: list[tuple[int, float] | None] = [None] * len(texts)
    kept: dict[int, list[int]] = {}  # group -> its kept rows so far: a cluster is represented by its first row
    for i, shared in _grouped_rows(groups):
        match = _best(digests, {j for g in shared for j in kept.get(g, ())}, i, threshold)
        out[i] = match
        if match is None:
            for g in shared:
                kept.setdefault(g, []).append(i)
    return out


def cross_matches(texts: list[str], reference: list[str], threshold: float = 0.7, ngram: int = 3,
                  num_perm: int = 128, seed: int = 0) -> list[tuple[int, float] | None]:
    """For each text, (index of the reference text it near-duplicates, estimated Jaccard), or None.
    Only the reference is indexed: texts are looked up, never matched with each other."""
    if not texts or not reference:
        return [None] * len(texts)
    digests, groups = _band_groups([*reference, *texts], threshold, ngram, num_perm, seed)
    refs: dict[int, list[int]] = {}
    out: list[tuple[int, float] | None] = [None] * len(texts)
    for i, shared in _grouped_rows(groups):  # reference rows come first
        if i < len(reference):
            for g in shared:
                refs.setdefault(g, []).append(i)
        else:
            out[i - len(reference)] = _best(digests, {j for g in shared for j in refs.get(g, ())}, i, threshold)
    return out


def ngram_index(documents: Iterable[str], n: int) -> set[int]:
    """Hashes of every word n-gram of the documents (benchmark items)."""
    index: set[int] = set()
    for doc in documents:
        w = words(doc)
        index.update(hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1))
    return index


def contaminated(text: str, index: set[int], n: int) -> bool:
    w = words(text)
    return any(hash(tuple(w[i:i + n])) in index for i in range(len(w) - n + 1))


def quality_problem(response: str, max_repeat_share: float = 0.3) -> str | None:
    """Why a response is not worth training on (empty, refusal boilerplate, runaway repetition), or None."""
    if not response.strip():
        return "empty response"
    if m := REFUSALS.search(response):
        return f"refusal boilerplate ({m.group(0)!r})"
    w = words(response)
    if len(w) >= 12:
        top = max(Counter(zip(w, w[1:], w[2:], strict=False)).values())
        if top * 3 / len(w) > max_repeat_share and top >= 4:
            return f"runaway repetition (one 3-gram repeats {top} times)"
    return None
