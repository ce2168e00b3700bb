from prefect import task
from prefect.artifacts import create_table_artifact

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.stages import filter as stage
from tasks._common import cache_key, stage_context


@task(name="filter", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["cpu"])
def filter(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Quality, dedup, near-dup, decontamination, length and judge filters; rejects kept with reasons."""
    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store, upstream)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The funnel (rows in and out per filter) as a table artifact."""
    funnel = store.manifest(ref.stage, ref.key)["funnel"]
    create_table_artifact(funnel, key="data-funnel", description=f"Rows in and out of each filter ({ref.uri})")
