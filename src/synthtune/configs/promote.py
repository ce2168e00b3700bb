"""promote's settings: when a candidate becomes the champion."""

from __future__ import annotations

from pydantic import model_validator

from synthtune.fields import Section, field


class PromoteConfig(Section):
    """The gate: the target task's metric against base and the champion, guard tasks, and the paired
    significance test on per-item correctness."""

    target_task: str = field(..., description="Task whose score decides promotion; must be one of evaluate.tasks.")
    metric: str = field("acc", "Metric compared for every task, e.g. acc, acc_norm, exact_match[strict-match].")
    min_delta: float = field(0.0, "Tuned minus base on the target task must be at least this to promote.")
    min_delta_vs_champion: float = field(
        0.0, "Tuned minus the champion (the adapter in service) on the target task must be at least this: 0 means at "
        "least as good, a negative value is a tolerance.")
    guard_tasks: list[str] = field([], "Tasks that must not get worse: each may drop by at most max_guard_drop "
                                   "against the champion (against base before the first promotion).")
    max_guard_drop: float = field(0.02, "Largest drop (reference minus tuned) allowed on any guard task.", ge=0)
    require_significance: bool = field(
        False, "Promote only when a paired McNemar test on the target task's items says the candidate's difference "
        "from the champion (from base before the first promotion) is significant.")
    significance_level: float = field(0.05, "p-value below which the difference counts as significant.", gt=0, lt=1)

    @model_validator(mode="after")
    def _no_guard_is_the_target(self) -> PromoteConfig:
        if self.target_task in self.guard_tasks:
            raise ValueError(f"'{self.target_task}' is both target_task and a guard task")
        return self
