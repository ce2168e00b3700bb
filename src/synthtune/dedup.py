"""Near-duplicates (MinHash LSH on rensa's Rust sketches), benchmark decontamination, quality heuristics.

Near-duplicates: word n-gram shingles of the normalized text, MinHash digests computed in bulk by
rensa, LSH banding done on the digest matrix with numpy, and every candidate pair verified by its
estimated Jaccard similarity before a row is dropped. The first row of a cluster is kept, the
others name it in their reason.
"""

from __future__ import annotations

import re
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


def near_duplicates(texts: list[str], threshold: float = 0.7, ngram: int = 3, num_perm: int = 128,
                    seed: int = 0) -> list[tuple[int, float] | None]:
    """For each text, (index of the earlier kept text it near-duplicates, estimated Jaccard), or None."""
    import numpy as np
    from rensa import RMinHash

    if not texts:
        return []
    matrix = RMinHash.digest_matrix_from_token_sets([sorted(shingles(t, ngram)) for t in texts], num_perm, seed)
    digests = np.asarray(matrix.to_rows(), dtype=np.uint32)
    bands, rows = lsh_bands(threshold, num_perm)
    band_view = np.ascontiguousarray(digests[:, : bands * rows]).view(np.dtype((np.void, 4 * rows)))
    band_view = band_view.reshape(len(texts), bands)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    out: list[tuple[int, float] | None] = []
    for i in range(len(texts)):
        keys = [band_view[i, b].tobytes() for b in range(bands)]
        candidates = {j for b, k in enumerate(keys) for j in buckets[b].get(k, ())}
        match = None
        if candidates:
            cand = np.fromiter(candidates, dtype=np.int64)
            sims = (digests[cand] == digests[i]).mean(axis=1)
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                match = (int(cand[best]), float(sims[best]))
        out.append(match)
        if match is None:  # only kept rows are indexed: a cluster is represented by its first row
            for b, k in enumerate(keys):
                buckets[b].setdefault(k, []).append(i)
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
        grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
        top = max(grams.count(g) for g in set(grams))
        if top * 3 / len(w) > max_repeat_share and top >= 4:
            return f"runaway repetition (one 3-gram repeats {top} times)"
    return None
