"""Budgets that stop a runaway night (cost.max_teacher_requests, max_teacher_usd, max_gpu_hours).

The teacher's budget is checked by generate before its first request, from what the night would
ask for (synthtune.generation.planned): over it, the stage stops naming the count, the budget and the
seed files responsible; the row cache keeps everything already answered. The GPU-hours budget is
checked by the training child at every checkpoint (stages/_train_child.py): hours are counted over
every attempt of one training (`hours.json` beside its checkpoints), so a retry resumes from the
checkpoint where the budget stopped it, and goes on only with a higher budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from synthtune.configs import CostConfig

HOURS = "hours.json"  # beside a training's checkpoints: device-hours used by its attempts so far
STOPPED = "over_budget.json"  # written by the training child when the budget stopped it


class BudgetError(RuntimeError):
    """A night over its budget, stopped before it spends more."""


def teacher_usd(cost: CostConfig, plan: dict) -> float | None:
    """The planned requests' upper cost estimate in US$ (None when the teacher is not priced)."""
    total, priced = 0.0, False
    for role in ("teacher", "judge"):
        prices = cost.token_prices(role)
        for n, price in zip(plan["tokens"][role], prices, strict=True):
            if price is not None:
                total, priced = total + n * price / 1e6, True
    return round(total, 4) if priced else None


def check_teacher(cost: CostConfig, plan: dict, seeds: str) -> None:
    """BudgetError when the planned requests are over cost.max_teacher_requests or max_teacher_usd
    (unless cost.allow_over_budget); a log-free no-op otherwise."""
    requests = plan["teacher"] + plan["judge"]
    usd = teacher_usd(cost, plan)
    over = []
    if cost.max_teacher_requests is not None and requests > cost.max_teacher_requests:
        over.append(f"{requests} requests ({plan['teacher']} to the teacher, {plan['judge']} to the judge) > "
                    f"cost.max_teacher_requests={cost.max_teacher_requests}")
    if cost.max_teacher_usd is not None:
        if usd is None:
            over.append("cost.max_teacher_usd is set but the teacher has no price (cost.teacher_usd_per_m_prompt, "
                        "teacher_usd_per_m_completion)")
        elif usd > cost.max_teacher_usd:
            over.append(f"an estimated ${usd:.2f} > cost.max_teacher_usd=${cost.max_teacher_usd:.2f}")
    if not over or cost.allow_over_budget:
        return
    files = ", ".join(f"{name} ({n} new)" for name, n in list(plan["by_file"].items())[:5])
    more = len(plan["by_file"]) - 5
    raise BudgetError(
        f"over tonight's teacher budget: {'; '.join(over)}. The requests come from generate.seeds {seeds}: {files}"
        + (f" and {more} more files" if more > 0 else "") + ". Nothing was asked, and every answer already made stays "
        "in the row cache. Check the seeds (a bad export, a glob matching too much), raise the budget, or rerun with "
        "--allow-over-budget (cost.allow_over_budget=true).")


def hours_used(work: Path) -> float:
    """Device-hours the earlier attempts of the training in `work` used."""
    path = work / HOURS
    return float(json.loads(path.read_text())["hours"]) if path.is_file() else 0.0


def record_hours(work: Path, hours: float) -> None:
    (work / HOURS).write_text(json.dumps({"hours": hours}))


def gpu_stop_message(stopped: dict, budget: float) -> str:
    """What the run says when the GPU-hours budget stopped training."""
    return (f"over the GPU budget: training used {stopped['hours']:.4f} device-hours ({stopped['devices']} "
            f"{stopped['device']}) > cost.max_gpu_hours={budget}; it stopped at its checkpoint at step {stopped['step']} "
            f"({stopped['checkpoint']}). A retry with a higher cost.max_gpu_hours resumes from there.")
