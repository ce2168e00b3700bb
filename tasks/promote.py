import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.configs import PipelineConfig
from synthtune.stages import promote as stage
from synthtune.store import ArtifactRef, ArtifactStore
from tasks._common import inline_png, stage_task
from tasks.events import model_decided


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef], **kw) -> ArtifactRef:
    """Tuned vs the champion and base (table, chart, flipped items); the decision goes to the registry."""
    ref = stage.run(cfg, store, upstream, **kw)
    if not ref.reused:  # a decision made now; automations notify on it (deployments/automations.py)
        model_decided(cfg.name, ref.summary)
    return ref


promote = stage_task(stage, tags=["cpu"], call=run)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The comparison table, the flipped items and the verdict with its chart."""
    png = inline_png(store, ref, "comparison.png", "base vs tuned")
    with store.local_copy(ref) as folder:
        saved = json.loads((folder / "verdict.json").read_text())
    create_table_artifact(ref.summary["comparison"], key="eval-comparison",
                          description="Base vs champion vs tuned (lm-eval, identical flags)")
    flipped = saved.get("flipped_items") or [  # a verdict from before answers were kept: the items alone
        {"task": task, "direction": d, "item": item} for task, f in saved["flips"].items() for d, items in f.items()
        for item in items]
    create_table_artifact(flipped or [{"task": "-", "direction": "-", "item": "no item changed"}], key="eval-flips",
                          description="Items that flipped between base and tuned")
    if sliced := ref.summary.get("slices"):  # sorted by delta, the worst first
        create_table_artifact([{k: r[k] for k in ("task", "slice", "items", "reference", "tuned", "delta", "p", "p_holm")}
                               for r in sliced], key="eval-slices",
                              description="Per-slice scores vs the champion (base on the first night), paired test "
                                          "with Holm correction across slices, worst first")
    verdict = ref.summary.get("outcome") or ("Promoted" if ref.summary["promoted"] else "NOT promoted")
    decided = "the gate's reasons when this verdict was reached:\n\n" if ref.reused else ""
    forgot = ref.summary.get("forgetting")
    forgetting = (f"\n\nGeneral-text loss (forgetting): base {forgot['base']:.4f}, champion "
                  f"{forgot['champion'] if forgot['champion'] is None else round(forgot['champion'], 4)}, "
                  f"tuned {forgot['tuned']:.4f} ({forgot['rise']:+.1%} over base)" if forgot and forgot.get("rise")
                  is not None else "")
    create_markdown_artifact(
        f"## {verdict}\n\n{decided}" + "\n".join(f"- {r}" for r in ref.summary["reasons"]) + forgetting
        + f"\n\n{png}\n\nVerdict: `{ref.uri}/verdict.json`",
        key="promotion-verdict", description="Promotion gate")
