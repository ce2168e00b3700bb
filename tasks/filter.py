from prefect.artifacts import create_table_artifact

from synthtune.stages import filter as stage
from synthtune.store import ArtifactRef, ArtifactStore
from tasks._common import stage_task

filter = stage_task(stage, tags=["cpu"], retries=1)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The funnel as a table artifact: what generate made (new rows vs answers reused from the row
    cache), then rows in and out of each filter."""
    manifest = store.manifest(ref.stage, ref.key)
    gen = (store.manifest("generate", manifest["upstream"]["generate"]) or {}).get("rows", {})
    first = {"filter": "generate", "rows_in": gen.get("seeds"), "rows_out": gen.get("output"),
             "dropped": gen.get("quarantined"),
             "note": f"{gen.get('new')} new rows; answers: {gen.get('reused')} reused, {gen.get('generated')} generated"}
    rows = [first, *({**f, "note": ""} for f in manifest["funnel"])]
    create_table_artifact(rows, key="data-funnel", description=f"Rows in and out of each step ({ref.uri})")
