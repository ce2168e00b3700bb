"""What a night may cost: prices (for the ledger) and budgets (that stop a runaway night); in no cache key."""

from __future__ import annotations

from synthtune.fields import Section, field


class CostConfig(Section):
    """Prices turn the ledger's counts (teacher tokens, GPU device-hours) into money; budgets stop a night
    before it spends too much. Every field is optional and in no cache key: changing a price or a budget
    never reruns anything."""

    teacher_usd_per_m_prompt: float | None = field(
        None, "Teacher: US$ per million prompt (input) tokens, as the provider bills them. Empty: not priced.",
        affects_output=False, ge=0)
    teacher_usd_per_m_completion: float | None = field(
        None, "Teacher: US$ per million completion (output) tokens. Empty: not priced.", affects_output=False, ge=0)
    judge_usd_per_m_prompt: float | None = field(
        None, "Judge: US$ per million prompt tokens. Empty: the teacher's price.", affects_output=False, ge=0)
    judge_usd_per_m_completion: float | None = field(
        None, "Judge: US$ per million completion tokens. Empty: the teacher's price.", affects_output=False, ge=0)
    gpu_usd_per_hour: dict[str, float] = field(
        {}, "US$ per GPU-hour by Prefect work pool, e.g. {gpu-a100: 2.5, default: 1.2}; `default` prices runs "
        "outside a pool or in a pool not listed. A stage on N devices uses N device-hours an hour.",
        affects_output=False)
    max_teacher_requests: int | None = field(
        None, "Most requests one night may send to the teacher and the judge together (what the row cache already "
        "holds is free). generate counts what it would ask for before the first request and stops over budget, "
        "naming the seed files responsible. Empty: no limit.", affects_output=False, ge=0)
    max_teacher_usd: float | None = field(
        None, "Most US$ one night's teacher and judge requests may cost, estimated before the first request from "
        "the prompts and max_new_tokens (needs the teacher's prices). Empty: no limit.", affects_output=False, ge=0)
    max_gpu_hours: float | None = field(
        None, "Most device-hours one training may use (devices x hours, over every attempt of a retried run; on a "
        "machine without a GPU, hours of training). Over it, training stops at its next checkpoint and the run "
        "fails saying so; a retry with a higher budget resumes from that checkpoint. Empty: no limit.",
        affects_output=False, gt=0)
    allow_over_budget: bool = field(
        False, "Go on although the teacher budget is exceeded (`--allow-over-budget`): the night is still "
        "counted in the ledger.", affects_output=False)

    def gpu_price(self, pool: str | None) -> float | None:
        """US$ per device-hour in `pool` (None: not priced)."""
        return self.gpu_usd_per_hour.get(pool or "default", self.gpu_usd_per_hour.get("default"))

    def token_prices(self, role: str) -> tuple[float | None, float | None]:
        """(prompt, completion) US$ per million tokens for the teacher, the judge or the rejected model."""
        teacher = (self.teacher_usd_per_m_prompt, self.teacher_usd_per_m_completion)
        if role == "judge":
            return (self.judge_usd_per_m_prompt if self.judge_usd_per_m_prompt is not None else teacher[0],
                    self.judge_usd_per_m_completion if self.judge_usd_per_m_completion is not None else teacher[1])
        return teacher if role == "teacher" else (None, None)  # the rejected model is local: its GPU time is priced
