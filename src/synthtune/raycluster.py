"""The Ray cluster a stage runs on (generate.engine: ray, train.engine: ray): the one at an address, or a
local cluster started for the stage and stopped after, so that nothing outlives the run."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from synthtune.child import kill_survivors

log = logging.getLogger("synthtune")

# what Ray workers need from this process's environment (offline mode, no telemetry, tokenizers)
# (for training, the pipeline run's MLflow run: synthtune.tracking.child_env), and how this process reaches
# an object-store artifact root, when it does so through the environment (the workers write the row cache
# and Ray's checkpoints there; a cluster whose nodes hold their own credentials needs none of these)
RAY_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK",
           "TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_CACHE", "SYNTHTUNE_CACHE", "PYTHONPATH",
           "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_MAX_LOG_PARAMS",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
           "GOOGLE_APPLICATION_CREDENTIALS")


@contextlib.contextmanager
def ray_session(address: str, what: str, num_cpus: int | None = None, log_to_driver: bool = False) -> Iterator:
    """Connect to `address` (ray://head:10001, or `auto` on a cluster node), or start a local Ray cluster
    for this process (`num_cpus`, default the machine's; no dashboard), and shut it down after: the
    calling child exits without running atexit hooks, which would otherwise be what stops a local
    cluster, and workers orphaned by the raylet's exit are killed."""
    import ray

    env = {k: os.environ[k] for k in RAY_ENV if k in os.environ}
    kwargs: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": log_to_driver, "ignore_reinit_error": True}
    if not address:  # a local cluster sized to this machine, without the dashboard
        kwargs.update(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, object_store_memory=256 << 20)
    ray.init(address=address or None, **kwargs)
    log.info("%s on Ray: %s, resources %s", what, address or "a local cluster", ray.cluster_resources())
    try:
        yield ray
    finally:
        import psutil

        started = psutil.Process().children(recursive=True)  # raylet, GCS, the actors' workers
        ray.shutdown()
        kill_survivors(started, grace=10)  # workers orphaned by the raylet's exit: nothing outlives the run
