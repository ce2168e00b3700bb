from prefect import task
from prefect.artifacts import create_markdown_artifact

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import template as stage
from tasks._common import cache_key, stage_context, summary_markdown


@task(name="template", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["cpu"])
def template(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Chat template, loss mask and token lengths; truncation counted."""
    with stage_context(cfg) as store:
        ref = stage.run(cfg, store, upstream)
    create_markdown_artifact(summary_markdown(ref), key="length-report", description="Templating and lengths")
    return ref
