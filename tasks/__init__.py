"""Thin Prefect tasks, one per stage: retries, tags, the run id in manifests, and the stage's reports
as Prefect artifacts.

Whether a stage is already done is decided in one place, the manifest on the artifact root
(synthtune.store.produce): a task always runs its stage, which reuses a finished, intact output in
milliseconds, and the task then ends in Prefect's `Cached` state (what the UI shows), carrying the
output's reference. Prefect's own task cache and result persistence are not used: retries, a Retry
from the UI, a run on another machine and `--refresh` all rest on the manifests.
"""
