from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.stages import train as stage
from synthtune.store import ArtifactRef, ArtifactStore
from tasks._common import inline_png, stage_task

RUN_FIELDS = ("start", "init", "rows", "optimizer_steps", "tokens_trained",  # where it started, what it read
              "mode", "quantization", "steps", "resumed_from_step", "micro_batch", "gradient_accumulation_steps",
              "tokens_per_s", "step_time_s", "mfu", "peak_gpu_memory_gib", "device", "packing", "liger",
              "first_loss", "last_loss")

train = stage_task(stage, tags=["gpu"], retries=1)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """Run metrics as a table, the loss curve as markdown."""
    png = inline_png(store, ref, "loss.png", "loss")
    create_table_artifact([{"field": f, "value": str(ref.summary.get(f))} for f in RUN_FIELDS],
                          key="train-metrics", description="Training run: throughput, memory, resume point")
    create_markdown_artifact(f"## Loss curve\n\n{png}\n\nAdapter: `{ref.uri}/adapter`",
                             key="loss-curve", description="Training loss")
