from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import promote as stage
from tasks._common import cache_key, stage_context


@task(name="promote", cache_key_fn=cache_key(stage), persist_result=True, tags=["cpu"])
def promote(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Base vs tuned comparison as a table; `latest` moves only when the gate passes."""
    with stage_context(cfg) as store:
        ref = stage.run(cfg, store, upstream)
    create_table_artifact(ref.summary["comparison"], key="eval-comparison", description="Base vs tuned (lm-eval)")
    verdict = "promoted" if ref.summary["promoted"] else "NOT promoted"
    create_markdown_artifact(f"## {verdict}\n\n" + "\n".join(f"- {r}" for r in ref.summary["reasons"]),
                             key="promotion-verdict", description="Promotion gate")
    return ref
