"""promote's settings: when a candidate becomes the champion."""

from __future__ import annotations

from pydantic import model_validator

from synthtune.fields import Section, field

MIN_DELTA = 0.005


class PromoteConfig(Section):
    """The gate: the target task's metric against base and the champion, guard tasks, and the paired
    significance test on per-item correctness."""

    target_task: str = field(..., description="Task whose score decides promotion; must be one of evaluate.tasks.")
    metric: str = field("acc", "Metric compared for every task, e.g. acc, acc_norm, exact_match[strict-match].")
    min_delta: float = field(
        MIN_DELTA, "Tuned minus base (and minus the champion, unless min_delta_vs_champion says otherwise) on the "
        "target task must be strictly more than this to promote: a tie is never evidence. The default, half a "
        "point, asks for at least one more item right out of 200.", ge=0)
    min_delta_vs_champion: float | None = field(
        None, "Tuned minus the champion (the adapter in service) on the target task must be strictly more than "
        "this. None: min_delta. A negative value is a tolerance that promotes without evidence (opt-in).")
    guard_tasks: list[str] = field([], "Tasks that must not get worse: each may drop by at most max_guard_drop "
                                   "against the champion (against base before the first promotion).")
    max_guard_drop: float = field(0.02, "Largest drop (reference minus tuned) allowed on any guard task.", ge=0)
    max_forgetting: float | None = field(
        0.1, "Largest relative rise of the general-text loss (evaluate.forgetting) over base: 0.1 rejects a candidate "
        "whose loss is more than 10% above base's. None: report only.", ge=0)
    require_significance: bool = field(
        False, "Promote only when a paired McNemar test on the target task's items says the candidate's difference "
        "from the champion (from base before the first promotion) is significant.")
    significance_level: float = field(0.05, "p-value below which the difference counts as significant.", gt=0, lt=1)

    @property
    def champion_delta(self) -> float:
        return self.min_delta if self.min_delta_vs_champion is None else self.min_delta_vs_champion

    @model_validator(mode="after")
    def _no_guard_is_the_target(self) -> PromoteConfig:
        if self.target_task in self.guard_tasks:
            raise ValueError(f"'{self.target_task}' is both target_task and a guard task")
        return self
