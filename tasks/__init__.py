"""Thin Prefect tasks, one per stage: cache key, retries, tags and published artifacts.

Every task's cache key is its stage's `key()` (synthtune.artifacts.stage_key), so Prefect's cache
and the artifact store agree on what "already done" means.
"""
