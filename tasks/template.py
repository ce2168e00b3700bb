import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from synthtune.stages import template as stage
from synthtune.store import ArtifactRef, ArtifactStore
from tasks._common import inline_png, stage_task

template = stage_task(stage, tags=["cpu"], retries=1)


def report(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The length report, its percentiles, and the first rows with what is trained on in bold."""
    _lengths(store, ref)
    with store.local_copy(ref) as folder:
        path = folder / "preview.json"
        rows = json.loads(path.read_text()) if path.exists() else []
    if rows:
        def md(part: str, trained: bool) -> str:
            text = part.replace("\\", "\\\\").replace("`", "\\`").replace("*", "\\*").replace("<", "&lt;")
            text = text.replace("\n", "↵<br>")
            return f"**{text}**" if trained and text.strip() else text

        body = "\n\n".join(f"**row {r['id']}**\n\n> " + "".join(md(p, t) for p, t in r["segments"]) for r in rows)
        create_markdown_artifact(f"## Templated rows (bold: trained)\n\n{body}", key="template-preview",
                                 description="The first rows after the chat template, with the tokens trained on")


def _lengths(store: ArtifactStore, ref: ArtifactRef) -> None:
    """The length report: percentiles as a table, counts, warnings and the histogram as markdown."""
    report = store.manifest(ref.stage, ref.key)["report"]
    png = inline_png(store, ref, "lengths.png", "token lengths")
    table = [{"split": split, "part": part, **stats} for split, parts in report["lengths"].items()
             for part, stats in parts.items()]
    create_table_artifact(table, key="length-percentiles", description="Token length percentiles per split")
    counts = ", ".join(f"{k}: {report[k]}" for k in ("rows_in", "rows_out", "quarantined", "dropped", "truncated",
                                                     "dropped_no_trained_token", "system_merged", "system_folded",
                                                     "double_bos_removed"))
    warnings = "".join(f"\n> **WARNING** {w}\n" for w in report["warnings"])
    create_markdown_artifact(
        f"## Length report\n{warnings}\n{counts}; trained-token share {report['trained_token_share']}\n\n"
        f"Worst rows: {report['worst_rows'][:5] or 'none over the limits'}\n\n"
        f"{png}\n\nFiles: `{ref.uri}/lengths.png`, `{ref.uri}/report.json`",
        key="length-report", description="Templating and token lengths")
