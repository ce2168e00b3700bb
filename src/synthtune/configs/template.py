"""template's settings: the chat template, the system prompt and the length limits."""

from __future__ import annotations

from typing import Any, Literal

from synthtune.fields import InputFile, Section, field

DATE_STRING = "26 Jul 2024"  # Llama 3.x templates' own fallback when no clock is given


class TemplateConfig(Section):
    """The chat template (the tokenizer's, or a file), the system prompt, and what happens to rows over
    the length limits (always counted in the report)."""

    max_length: int = field(1024, "Most tokens per templated row (TRL's `max_length`).", ge=8)
    max_prompt_length: int | None = field(
        None, "Preference data: most prompt tokens (TRL 1.x has no such limit; it is enforced here). "
        "None: half of max_length.", ge=1)
    truncation: Literal["drop", "truncate", "error"] = field(
        "drop",
        "Rows over the limits: `drop` them, `truncate` them (keep the start of a reply, the end of a prompt; rows "
        "left with no trained token are dropped), or fail with `error`. Every case is counted in the report.",
    )
    system_prompt: str | None = field(None, "System prompt put in front of every conversation.")
    chat_template: InputFile | None = field(
        None, "A Jinja chat template file used instead of the tokenizer's (its contents are in the cache key).")
    chat_template_kwargs: dict[str, Any] = field(
        {}, "Variables for the chat template (e.g. {enable_thinking: false} for Qwen3), given alike to training, "
        "evaluation and the template saved for serving (written into it as defaults).")
    date_string: str = field(
        DATE_STRING, "The date a template that prints today's date renders (Llama 3.x's `date_string`), pinned so a "
        "row, a base evaluation and a served prompt render the same on every day. Only templates that read a date "
        "get it.")
    warn_cut_share: float = field(
        0.01, "Above this share of rows cut or dropped for length, the report warns loudly.", ge=0, le=1,
        affects_output=False)
