from prefect import task

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import preflight as stage
from tasks._common import cache_key, stage_context


@task(name="preflight", cache_key_fn=cache_key(stage), persist_result=True, tags=["cpu"])
def preflight(cfg: PipelineConfig, upstream: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """Models load without remote code, chat template present, eval tasks exist, disk is free."""
    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store)
