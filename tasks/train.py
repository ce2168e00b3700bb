from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.stages import train as stage
from tasks._common import cache_key, inline_png, stage_context

RUN_FIELDS = ("mode", "quantization", "steps", "resumed_from_step", "micro_batch", "gradient_accumulation_steps",
              "tokens_per_s", "step_time_s", "mfu", "peak_gpu_memory_gib", "device", "packing", "liger",
              "first_loss", "last_loss")


@task(name="train", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["gpu"])
def train(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """LoRA / QLoRA in a child process; a retry resumes from the newest valid checkpoint."""
    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store, upstream)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """Run metrics as a table, the loss curve as markdown."""
    png = inline_png(store, ref, "loss.png", "loss")
    create_table_artifact([{"field": f, "value": str(ref.summary.get(f))} for f in RUN_FIELDS],
                          key="train-metrics", description="Training run: throughput, memory, resume point")
    create_markdown_artifact(f"## Loss curve\n\n{png}\n\nAdapter: `{ref.uri}/adapter`",
                             key="loss-curve", description="Training loss")
