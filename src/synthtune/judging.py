"""Judge calibration: before the judge rates any real row, it rates a labelled set, and the run stops
when it disagrees with the people who labelled it.

`generate.judge_calibration` is a JSONL file, one labelled answer per line:
`{"prompt": ..., "response": ..., "rating": 1-5}` or `{..., "accept": true|false}`. An answer is
accepted at `generate.judge_accept_rating` or above (the judge's rating and a human rating alike).
Reported: Cohen's kappa on accept/reject, the precision and recall of the judge's rejections, and
position consistency: for every prompt labelled with two or more answers, the first two are rated
together in both orders, and the judge must prefer the same answer both times (a tie counts as a
preference for neither). Below `judge_min_kappa` or `judge_min_position_consistency`, generation
stops before the teacher is asked anything, naming the figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CalibrationError", "Label", "agreement", "consistency", "load"]


class CalibrationError(ValueError):
    """The calibration file is unusable, or the judge disagrees with it too much."""


@dataclass(frozen=True)
class Label:
    line: int
    prompt: str
    response: str
    accept: bool


def load(path: Path, accept_at: float) -> list[Label]:
    """The labelled answers; an error names file:line for a malformed one."""
    labels = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise CalibrationError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("prompt", "response")):
            raise CalibrationError(f"{where}: needs text fields 'prompt' and 'response'")
        if isinstance(row.get("accept"), bool):
            accept = row["accept"]
        elif isinstance(row.get("rating"), int | float) and not isinstance(row.get("rating"), bool):
            accept = row["rating"] >= accept_at
        else:
            raise CalibrationError(f"{where}: needs a human 'rating' (a number) or 'accept' (true/false)")
        labels.append(Label(n, row["prompt"], row["response"], accept))
    if not labels:
        raise CalibrationError(f"{path}: no labelled answers")
    if len({lab.accept for lab in labels}) < 2:
        raise CalibrationError(f"{path}: every answer is {'accepted' if labels[0].accept else 'rejected'}; "
                               "agreement needs both accepted and rejected examples")
    return labels


def agreement(human: list[bool], judge: list[bool | None]) -> dict:
    """Cohen's kappa between accept/reject labels (an unrated answer counts as the judge disagreeing),
    and the precision and recall of the judge's rejections."""
    n = len(human)
    judged = [j if j is not None else not h for h, j in zip(human, judge, strict=True)]
    observed = sum(h == j for h, j in zip(human, judged, strict=True)) / n
    h_yes, j_yes = sum(human) / n, sum(judged) / n
    expected = h_yes * j_yes + (1 - h_yes) * (1 - j_yes)
    kappa = 1.0 if expected == 1 else (observed - expected) / (1 - expected)
    rejected = [not j for j in judged]
    hits = sum(r and not h for r, h in zip(rejected, human, strict=True))
    return {"items": n, "unrated": sum(j is None for j in judge), "agreement": round(observed, 4),
            "kappa": round(kappa, 4),
            "reject_precision": round(hits / sum(rejected), 4) if any(rejected) else None,
            "reject_recall": round(hits / (n - sum(human)), 4) if n > sum(human) else None}


def consistency(forward: list[list | None], backward: list[list | None]) -> dict:
    """Position consistency over pairs rated as [a, b] (`forward`) and [b, a] (`backward`): the share
    whose preferred answer is the same both ways (a pair left unrated counts as inconsistent)."""
    def prefers(ratings) -> int | None:  # 0: the first shown, 1: the second, -1: a tie
        if not ratings or len(ratings) < 2 or not all(isinstance(r, int | float) for r in ratings[:2]):
            return None
        return -1 if ratings[0] == ratings[1] else (0 if ratings[0] > ratings[1] else 1)

    same = 0
    for f, b in zip(forward, backward, strict=True):
        pf, pb = prefers(f), prefers(b)
        same += pf is not None and pb is not None and (pf == pb == -1 or (pf >= 0 and pb >= 0 and pf != pb))
    return {"pairs": len(forward), "consistent": same, "share": round(same / len(forward), 4) if forward else None}


def pairs(labels: list[Label]) -> list[tuple[Label, Label]]:
    """The first two labelled answers of every prompt that has two or more."""
    by_prompt: dict[str, list[Label]] = {}
    for lab in labels:
        by_prompt.setdefault(lab.prompt, []).append(lab)
    return [(group[0], group[1]) for group in by_prompt.values() if len(group) >= 2]
