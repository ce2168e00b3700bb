from prefect.artifacts import create_table_artifact

from synthtune.stages import filter as stage
from synthtune.store import ArtifactRef, ArtifactStore
from tasks._common import stage_task

filter = stage_task(stage, tags=["cpu"], retries=1)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The funnel as a table artifact: what generate made (new rows vs answers reused from the row
    cache), then rows in and out of each filter."""
    manifest = store.manifest(ref.stage, ref.key)
    generated = store.manifest("generate", manifest["upstream"]["generate"]) or {}
    gen = generated.get("rows", {})
    first = {"filter": "generate", "rows_in": gen.get("seeds"), "rows_out": gen.get("output"),
             "dropped": gen.get("quarantined"),
             "note": f"{gen.get('new')} new rows; answers: {gen.get('reused')} reused, {gen.get('generated')} generated"}
    rows = [first, *({**f, "note": ""} for f in manifest["funnel"])]
    if cal := (generated.get("metrics") or {}).get("judge_calibration"):  # what the judge's ratings are worth
        position = cal["position"]["share"]
        rows.insert(0, {"filter": "judge calibration", "rows_in": cal["items"], "rows_out": cal["items"] - cal["unrated"],
                        "dropped": cal["unrated"],
                        "note": f"{cal['judge']} vs human labels: kappa {cal['kappa']:.3f}, rejections precision "
                                f"{cal['reject_precision']} recall {cal['reject_recall']}, position consistency "
                                f"{'-' if position is None else f'{position:.0%}'} of {cal['position']['pairs']} pairs"})
    create_table_artifact(rows, key="data-funnel", description=f"Rows in and out of each step ({ref.uri})")
