from prefect import task

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import generate as stage
from tasks._common import cache_key, stage_context


@task(name="generate", cache_key_fn=cache_key(stage), persist_result=True, retries=2, tags=["teacher"])
def generate(cfg: PipelineConfig, upstream: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """Synthetic answers from the teacher through distilabel."""
    with stage_context(cfg) as store:
        return stage.run(cfg, store)
