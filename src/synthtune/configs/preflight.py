"""preflight's settings: what is checked before any data or GPU time is spent."""

from __future__ import annotations

from synthtune.fields import Section, field


class PreflightConfig(Section):
    """What is checked before any data or GPU time: free disk at the artifact root, and whether models
    that need remote code are allowed."""

    min_free_gb: float = field(1.0, "Free disk (GiB) required at the artifact root before anything runs.", ge=0)
    allow_remote_code: bool = field(
        False, "Allow models whose architecture needs `trust_remote_code`. Off: such models are refused."
    )
