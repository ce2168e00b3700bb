import json

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.stages import promote as stage
from tasks._common import cache_key, inline_png, stage_context
from tasks.events import model_decided


@task(name="promote", cache_key_fn=cache_key(stage), persist_result=True, tags=["cpu"])
def promote(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Tuned vs the champion and base (table, chart, flipped items); the decision goes to the registry."""
    with stage_context(cfg, stage.STAGE) as store:
        ref = stage.run(cfg, store, upstream)
    model_decided(cfg.name, ref.summary)  # automations notify on it (deployments/automations.py)
    return ref


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The comparison table, the flipped items and the verdict with its chart."""
    png = inline_png(store, ref, "comparison.png", "base vs tuned")
    with store.local_copy(ref) as folder:
        flips = json.loads((folder / "verdict.json").read_text())["flips"]
    create_table_artifact(ref.summary["comparison"], key="eval-comparison",
                          description="Base vs champion vs tuned (lm-eval, identical flags)")
    flipped = [{"task": task, "direction": d, "item": item} for task, f in flips.items() for d, items in f.items()
               for item in items]
    create_table_artifact(flipped or [{"task": "-", "direction": "-", "item": "no item changed"}], key="eval-flips",
                          description="Items that flipped between base and tuned")
    verdict = "Promoted: the new champion" if ref.summary["promoted"] else "NOT promoted: the champion stays in service"
    create_markdown_artifact(
        f"## {verdict}\n\n" + "\n".join(f"- {r}" for r in ref.summary["reasons"])
        + f"\n\n{png}\n\nVerdict: `{ref.uri}/verdict.json`",
        key="promotion-verdict", description="Promotion gate")
