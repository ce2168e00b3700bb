"""The post-training loop as one Prefect flow: every stage a cached, retryable task.

Run as: synthtune run [CONFIG] [a.b=value ...]     (embedded Prefect server, no setup)
Deploy: prefect deploy --prefect-file deployments/prefect.yaml --all
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

# deployments load this file by path; make `tasks` importable from the project root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.filesystems import RemoteFileSystem  # noqa: E402
from prefect.states import Completed  # noqa: E402

from synthtune.artifacts import ArtifactRef, ArtifactStore  # noqa: E402
from synthtune.config import PipelineConfig, to_yaml  # noqa: E402
from synthtune.runner import DAG  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.filter import filter  # noqa: E402
from tasks.generate import generate  # noqa: E402
from tasks.preflight import preflight  # noqa: E402
from tasks.promote import promote  # noqa: E402
from tasks.template import template  # noqa: E402
from tasks.train import train  # noqa: E402

TASKS = {t.name: t for t in (preflight, generate, filter, template, train, evaluate, promote)}


def result_storage(cfg: PipelineConfig):
    """Prefect's persisted task results live beside the artifacts, so caching survives restarts."""
    store = ArtifactStore(cfg.artifact_root)
    if store.local:
        return Path(store.root) / ".prefect-results"
    # object stores: a saved RemoteFileSystem block (fsspec underneath), named after the root
    name = "synthtune-results-" + hashlib.sha256(store.uri().encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=store.uri(".prefect-results")).save(name, overwrite=True)
    return f"remote-file-system/{name}"


@flow(name="synthtune", log_prints=False, persist_result=True)
def pipeline(config: PipelineConfig) -> dict[str, ArtifactRef]:
    """preflight -> generate -> filter -> template -> train -> evaluate (base, tuned) -> promote.

    Ends `Completed`, or `Completed` named `NotPromoted` (reasons in its message and the
    promotion-verdict artifact) when the adapter failed the gate and `latest` was left alone."""
    create_markdown_artifact(f"```yaml\n{to_yaml(config)}```", key="resolved-config",
                             description=f"Resolved config of pipeline '{config.name}'")
    storage = result_storage(config)
    refs: dict[str, ArtifactRef] = {}
    for step in DAG:
        task = TASKS[step.stage.STAGE].with_options(task_run_name=step.name, result_storage=storage)
        refs[step.name] = task(config, {arg: refs[src] for arg, src in step.inputs.items()})
    verdict = refs["promote"].summary
    if not verdict["promoted"]:  # a finished run whose adapter failed the gate: say so in the run's state
        return Completed(name="NotPromoted", message="; ".join(verdict["reasons"]), data=refs)
    return refs
