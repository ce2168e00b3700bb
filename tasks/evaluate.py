from prefect import task

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import evaluate as stage
from tasks._common import cache_key, stage_context


@task(name="evaluate", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["gpu"])
def evaluate(cfg: PipelineConfig, upstream: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """lm-eval on the base student (no upstream) or on the adapter of upstream['train']."""
    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store, upstream)
