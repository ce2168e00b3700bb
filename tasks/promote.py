import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.stages import promote as stage
from tasks._common import cache_key, inline_png, stage_context


@task(name="promote", cache_key_fn=cache_key(stage), persist_result=True, tags=["cpu"])
def promote(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Base vs tuned (table, chart, flipped items); `latest` moves only when the gate passes."""
    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store, upstream)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The comparison table, the flipped items and the verdict with its chart."""
    png = inline_png(store, ref, "comparison.png", "base vs tuned")
    with store.local_copy(ref) as folder:
        flips = json.loads((folder / "verdict.json").read_text())["flips"]
    create_table_artifact(ref.summary["comparison"], key="eval-comparison", description="Base vs tuned (lm-eval)")
    flipped = [{"task": task, "direction": d, "item": item} for task, f in flips.items() for d, items in f.items()
               for item in items]
    create_table_artifact(flipped or [{"task": "-", "direction": "-", "item": "no item changed"}], key="eval-flips",
                          description="Items that flipped between base and tuned")
    verdict = "Promoted" if ref.summary["promoted"] else "NOT promoted: `latest` unchanged"
    create_markdown_artifact(
        f"## {verdict}\n\n" + "\n".join(f"- {r}" for r in ref.summary["reasons"])
        + f"\n\n{png}\n\nVerdict: `{ref.uri}/verdict.json`",
        key="promotion-verdict", description="Promotion gate")
