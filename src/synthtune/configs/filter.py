"""filter's settings: which synthetic rows are kept, and the in-domain holdout."""

from __future__ import annotations

from pydantic import model_validator

from synthtune.fields import Section, field


class FilterConfig(Section):
    """Which synthetic rows are kept, in order: quality, control tokens, exact and near-duplicate
    removal, decontamination against the eval tasks, token-length bounds, the judge's score; then the
    in-domain holdout by seed id. Every dropped row is kept in rejects with its filter and reason."""

    quality: bool = field(True, "Drop empty responses, refusal boilerplate and runaway repetition.")
    control_tokens: bool = field(
        True, "Drop rows whose prompt or answer holds a special token of the student's tokenizer (a literal "
        "`<|im_end|>`, say): through the chat template it would become a real control token.")
    dedup: bool = field(True, "Drop rows whose prompt repeats another's after lower-casing and collapsing spaces.")
    near_dedup: bool = field(True, "Drop near-duplicate rows (MinHash LSH over prompt + response word n-grams).")
    near_dedup_threshold: float = field(0.7, "Estimated Jaccard similarity at which two rows are near-duplicates.",
                                        gt=0, lt=1)
    near_dedup_ngram: int = field(3, "Words per shingle for near-duplicate detection.", ge=1, le=16)
    decontaminate: bool = field(True, "Drop rows sharing a long n-gram with any item of the local eval tasks.")
    decontaminate_ngram: int = field(13, "Words in the n-gram that marks contamination.", ge=4, le=64)
    min_judge_score: float | None = field(None, "Drop rows whose `rating` column (judge score) is below this.")
    min_tokens: int = field(1, "Fewest response tokens (student tokenizer) a row may have.", ge=0)
    max_tokens: int = field(1024, "Most response tokens (student tokenizer) a row may have.", ge=1)
    holdout_fraction: float = field(
        0.0, "Share of seeds set aside (never trained on) for evaluate's in-domain task. A seed's side is decided by a "
        "hash of its id alone: it never moves as data grows, and all generations of one seed fall on the same side.",
        ge=0, lt=1)

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.max_tokens})")
        return self
