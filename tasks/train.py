from prefect import task
from prefect.artifacts import create_markdown_artifact

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import train as stage
from tasks._common import cache_key, stage_context, summary_markdown


@task(name="train", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["gpu"])
def train(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """LoRA / QLoRA fine-tuning with TRL; loss, tokens/s and the adapter location published."""
    with stage_context(cfg) as store:
        ref = stage.run(cfg, store, upstream)
    create_markdown_artifact(summary_markdown(ref), key="train-summary", description="Training run")
    return ref
