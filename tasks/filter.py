from prefect import task
from prefect.artifacts import create_table_artifact

from synthtune.artifacts import ArtifactRef, ArtifactStore
from synthtune.config import PipelineConfig
from synthtune.stages import filter as stage
from tasks._common import cache_key, stage_context


@task(name="filter", cache_key_fn=cache_key(stage), persist_result=True, retries=1, tags=["cpu"])
def filter(cfg: PipelineConfig, upstream: dict[str, ArtifactRef]) -> ArtifactRef:
    """Quality, dedup, near-dup, decontamination, length and judge filters; rejects kept with reasons."""
    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store, upstream)


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
