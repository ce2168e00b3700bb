"""`synthtune cost`: what each night cost, per night and per stage (synthtune.ledger)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from synthtune.cli.common import ConfigArg, Overrides, app, console, load


def by_stage(night: dict, stages) -> str:
    """Each stage's part of a night: its US$ where priced, else its seconds; `cached` when it cost nothing."""
    from synthtune.ledger import money

    parts = []
    for stage in stages:
        lines = [s for s in night["steps"] if s["stage"] == stage]
        if not lines:
            continue
        usd = [s["usd"] for s in lines if s["usd"] is not None]
        what = ("cached" if all(s["cached"] for s in lines) else money(sum(usd)) if usd and sum(usd)
                else f"{sum(s['wall_s'] or 0 for s in lines):.0f} s")
        parts.append(f"{stage} {what}")
    return ", ".join(parts)


@app.command()
def cost(config: ConfigArg = None, overrides: Overrides = None,
         nights: Annotated[int, typer.Option(help="Show the last N nights.", min=1)] = 14) -> None:
    """Cost per night and per stage: US$ where `cost:` has prices, teacher and judge requests and tokens,
    GPU device-hours (absent on a machine without a GPU), the saving by caching, the cost per point gained."""
    from synthtune import STAGES
    from synthtune.ledger import history, money
    from synthtune.store import ArtifactStore

    cfg = load(config, overrides)
    store = ArtifactStore(cfg.artifact_root)
    ledgers = history(store, cfg.name, nights)
    if not ledgers:
        console.print(f"no nights recorded for '{escape(cfg.name)}' under {escape(store.uri('ledger', cfg.name))} yet: "
                      "run the pipeline (`synthtune run`)", highlight=False)
        return
    table = Table(title=f"'{cfg.name}': cost per night ({store.uri('ledger', cfg.name)})")
    for col in ("night", "run", "total", "saved", "requests", "tokens", "GPU dev-h", "per point",
                "promoted", "by stage"):  # night: MM-DD HH:MM (UTC)
        wide = col == "by stage"  # the numbers stay on one line; the stages wrap
        table.add_column(col, overflow="fold", no_wrap=not wide, min_width=30 if wide else None,
                         justify="left" if col in ("night", "run", "by stage") else "right")
    for x in ledgers:
        gpu = f"{x['gpu_hours']:.4f}" if x["gpu_hours"] is not None else "absent"
        table.add_row((x.get("created_at") or "")[5:16].replace("T", " "), (x.get("run_id") or "")[:8],
                      money(x["usd"]) if x["priced"] else "not priced", money(x["saved_usd"]),
                      str(sum(x["requests"].values())),
                      f"{sum(x['prompt_tokens'].values())}+{sum(x['completion_tokens'].values())}", gpu,
                      money(x.get("usd_per_point")), "yes" if x.get("promoted") else "no", by_stage(x, STAGES))
    console.print(table)
    if not any(x["priced"] for x in ledgers):
        console.print("not priced: a stage shows its seconds; set cost.teacher_usd_per_m_prompt, "
                      "teacher_usd_per_m_completion and gpu_usd_per_hour for money", highlight=False)
    if (absent := next((x["gpu_absent"] for x in reversed(ledgers) if x.get("gpu_absent")), None)):
        console.print(f"GPU device-hours absent: {absent}", highlight=False)
