from prefect import task
from prefect.artifacts import create_table_artifact

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import filter as stage
from tasks._common import cache_key, stage_context


@task(name="filter", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["cpu"])
def filter(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Dedup and length bounds; the funnel (rows in and out per filter) as a table artifact."""
    with stage_context(cfg, stage.STAGE) as store:
        ref = stage.run(cfg, store, upstream)
        funnel = store.manifest(ref.stage, ref.key)["funnel"]
    create_table_artifact(funnel, key="data-funnel", description=f"Rows in and out of each filter ({ref.uri})")
    return ref
