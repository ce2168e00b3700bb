"""What a night cost: one ledger per pipeline run, from the manifests of the outputs it used.

Every output's manifest records what building it used (`usage`: synthtune.usage, and the teacher's
and judge's calls from generate). A night's ledger lists each step: built tonight (its usage, priced
by `cost:`) or cached (it cost nothing tonight; what it cost when it was built is the saving). Totals:
the night's cost, the saving (the same night with no cache costs cost + saved), teacher and judge
requests and tokens, GPU device-hours (absent, and labelled so, on a machine without a GPU), and for a
promoted model the cost per point gained on the target task.

Prices are optional: an unpriced part is counted but has no money (None, never 0). The ledger is
written to `{root}/ledger/{pipeline}/{run_id}.json` (a retried run rewrites its own) and read back by
`synthtune cost`, `synthtune models`, the Prefect artifacts and MLflow.
"""

from __future__ import annotations

import time
from typing import Any

from synthtune import progress
from synthtune.configs import PipelineConfig
from synthtune.store import ArtifactRef, ArtifactStore

ROLES = ("teacher", "judge", "rejected")


def _add(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


def priced(usage: dict, cfg: PipelineConfig) -> dict[str, float | None]:
    """US$ of one build's usage: its teacher and judge tokens, and its GPU device-hours in its work pool;
    None for each part that has no price (or, for the GPU, no device)."""
    cost = cfg.cost
    out: dict[str, float | None] = {"teacher_usd": None, "judge_usd": None, "gpu_usd": None}
    for role, calls in (usage.get("calls") or {}).items():
        p_price, c_price = cost.token_prices(role)
        for n, price in ((calls.get("prompt_tokens", 0), p_price), (calls.get("completion_tokens", 0), c_price)):
            if price is not None and role in ("teacher", "judge"):
                out[f"{role}_usd"] = _add(out[f"{role}_usd"], n * price / 1e6)
    gpu, price = usage.get("gpu"), cost.gpu_price(usage.get("pool"))
    if gpu and price is not None:
        out["gpu_usd"] = gpu["device_seconds"] / 3600 * price
    out["usd"] = None
    for part in ("teacher_usd", "judge_usd", "gpu_usd"):
        out["usd"] = _add(out["usd"], out[part])
    return out


def _line(name: str, ref: ArtifactRef, manifest: dict, cfg: PipelineConfig) -> dict[str, Any]:
    usage = manifest.get("usage") or {}
    built = priced(usage, cfg)
    gpu = usage.get("gpu")
    calls = usage.get("calls") or {}
    line = {"step": name, "stage": ref.stage, "key": ref.key, "cached": ref.reused,
            "built_at": manifest.get("created_at"), "pool": usage.get("pool"),
            "measured": bool(usage)}  # False: an output written before the ledger existed
    if ref.reused:  # nothing ran tonight: no seconds, no calls, no money; what it cost then is saved
        line.update(wall_s=0.0, cpu_s=0.0, gpu_hours=0.0 if gpu else None, calls={}, usd=0.0 if built["usd"] is not None
                    else None, saved_usd=built["usd"], saved_requests=sum(c.get("requests", 0) for c in calls.values()))
    else:
        line.update(wall_s=usage.get("wall_s"), cpu_s=usage.get("cpu_s"),
                    gpu_hours=round(gpu["device_seconds"] / 3600, 6) if gpu else None,
                    peak_gpu_memory_gib=gpu.get("peak_memory_gib") if gpu else None,
                    calls=calls, usd=built["usd"], saved_usd=None, saved_requests=0,
                    **{k: v for k, v in built.items() if k != "usd"})
    line["gpu_absent"] = usage.get("gpu_absent") if not gpu else None
    return line


def night(cfg: PipelineConfig, refs: dict[str, ArtifactRef], run_id: str | None = None) -> dict[str, Any]:
    """The ledger of one run from its steps' outputs (`refs`, step name -> output)."""
    store = ArtifactStore(cfg.artifact_root)
    lines = [_line(name, ref, store.manifest(ref.stage, ref.key) or {}, cfg) for name, ref in refs.items()]
    total: dict[str, Any] = {"usd": None, "saved_usd": None, "gpu_hours": None, "wall_s": 0.0,
                             "requests": {r: 0 for r in ROLES}, "prompt_tokens": {r: 0 for r in ROLES},
                             "completion_tokens": {r: 0 for r in ROLES}, "retries": 0, "cache_hits": 0}
    for line in lines:
        total["usd"] = _add(total["usd"], line["usd"])
        total["saved_usd"] = _add(total["saved_usd"], line["saved_usd"])
        total["gpu_hours"] = _add(total["gpu_hours"], line["gpu_hours"])
        total["wall_s"] += line["wall_s"] or 0.0
        for role, calls in line["calls"].items():
            for field_ in ("requests", "prompt_tokens", "completion_tokens"):
                total[field_][role] = total[field_].get(role, 0) + calls.get(field_, 0)
            total["retries"] += calls.get("retries", 0)
            total["cache_hits"] += calls.get("cache_hits", 0)
    if total["usd"] is not None and total["saved_usd"] is None:  # priced, and nothing was cached: nothing saved
        total["saved_usd"] = 0.0
    gpu_steps = [line for line in lines if line["stage"] in ("train", "evaluate")]
    absent = next((line["gpu_absent"] for line in gpu_steps if line["gpu_absent"]), None)
    promote = refs.get("promote")
    out = {"pipeline": cfg.name, "run_id": run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "priced": total["usd"] is not None or total["saved_usd"] is not None, "steps": lines, **total,
           "gpu_absent": absent if total["gpu_hours"] is None else None,
           "train_key": refs["train"].key if "train" in refs else None,
           "promoted": bool(promote and promote.summary.get("promoted") and not promote.reused),
           "gain_points": None, "usd_per_point": None}
    if out["promoted"]:
        target, metric = cfg.promote.target_task, cfg.promote.metric
        reference = refs.get("evaluate[champion]") or refs.get("evaluate[base]")
        try:
            gain = (refs["evaluate[tuned]"].summary["scores"][target][metric]
                    - reference.summary["scores"][target][metric]) * 100
        except (KeyError, TypeError, AttributeError):
            gain = None
        out["gain_points"] = round(gain, 3) if gain is not None else None
        full = _add(out["usd"], out["saved_usd"])  # what this model took to make: the night with no cache
        if gain and gain > 0 and full is not None:
            out["usd_per_point"] = full / gain
    return out


def record(cfg: PipelineConfig, refs: dict[str, ArtifactRef], run_id: str) -> dict[str, Any]:
    """Write the run's ledger on the root and announce it (a `night_cost` event: MLflow, the terminal)."""
    ledger = night(cfg, refs, run_id)
    ArtifactStore(cfg.artifact_root).write_json(("ledger", cfg.name, f"{run_id}.json"), ledger)
    progress.emit("night_cost", ledger=ledger)
    return ledger


def history(store: ArtifactStore, pipeline: str, nights: int | None = None) -> list[dict[str, Any]]:
    """The pipeline's ledgers, oldest first (the last `nights` of them)."""
    folder = store.path("ledger", pipeline)
    if not store.fs.exists(folder):
        return []
    found = [store.read_json(("ledger", pipeline, p.rsplit("/", 1)[-1])) for p in store.fs.ls(folder, detail=False)
             if p.endswith(".json")]
    found = sorted((x for x in found if x), key=lambda x: x.get("created_at") or "")
    return found[-nights:] if nights else found


def by_train_key(store: ArtifactStore, pipeline: str) -> dict[str, dict[str, Any]]:
    """train key -> the ledger of the night that trained it (not a night that found it cached)."""
    out = {}
    for ledger in history(store, pipeline):
        train = next((s for s in ledger["steps"] if s["step"] == "train"), None)
        if train and not train["cached"]:
            out[train["key"]] = ledger
    return out


def money(usd: float | None) -> str:
    """US$ as people read it: cents from a dollar, four decimals below, two significant digits under a cent
    (a tiny demo costs fractions of a cent); '-' when not priced."""
    if usd is None:
        return "-"
    if usd == 0 or abs(usd) >= 1:
        return f"${usd:,.2f}"
    return f"${usd:.4f}" if abs(usd) >= 0.01 else f"${usd:.2g}"


def summary_line(ledger: dict[str, Any]) -> str:
    """One line for the terminal and the verdict: the night's cost, the saving, the teacher's counts,
    the GPU hours (or why there are none), the cost per point."""
    requests, tokens_in, tokens_out = (sum(ledger[f].values()) for f in ("requests", "prompt_tokens", "completion_tokens"))
    gpu = (f"GPU {ledger['gpu_hours']:.4f} device-h" if ledger["gpu_hours"] is not None
           else f"GPU absent ({ledger.get('gpu_absent') or 'no GPU stage ran'})")
    parts = [f"cost {money(ledger['usd'])}" if ledger["priced"] else "cost not priced (set cost: prices)",
             f"saved by caching {money(ledger['saved_usd'])}" if ledger["priced"] else None,
             f"teacher+judge {requests} requests, {tokens_in}+{tokens_out} tokens", gpu]
    if ledger.get("usd_per_point") is not None:
        parts.append(f"{money(ledger['usd_per_point'])} per point gained (+{ledger['gain_points']:.1f})")
    return "; ".join(p for p in parts if p)


def table_rows(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per step (the Prefect artifact's table): cached or built tonight, seconds, GPU hours,
    teacher and judge calls, US$ and the saving."""
    rows = []
    for s in ledger["steps"]:
        calls = s["calls"]
        rows.append({
            "step": s["step"], "tonight": "cached (costs nothing)" if s["cached"] else "built",
            "wall_s": s["wall_s"], "cpu_s": s["cpu_s"],
            "gpu_hours": s["gpu_hours"] if s["gpu_hours"] is not None else f"absent: {s['gpu_absent']}",
            "requests": sum(c.get("requests", 0) for c in calls.values()),
            "tokens": "+".join(str(sum(c.get(f, 0) for c in calls.values())) for f in ("prompt_tokens", "completion_tokens")),
            "usd": money(s["usd"]), "saved_usd": money(s["saved_usd"])})
    return rows


def plot_history(ledgers: list[dict[str, Any]], path) -> None:
    """Cost per night, stacked by part (teacher, judge, GPU) when priced, else the teacher's requests and
    the GPU hours; the saving by caching as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [(x.get("created_at") or "")[:10] for x in ledgers]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    xs = range(len(ledgers))
    if any(x["priced"] for x in ledgers):
        bottom = [0.0] * len(ledgers)
        for part, color in (("teacher_usd", "#4c72b0"), ("judge_usd", "#8172b2"), ("gpu_usd", "#dd8452")):
            values = [sum(s.get(part) or 0.0 for s in x["steps"]) for x in ledgers]
            ax.bar(xs, values, bottom=bottom, color=color, label=part.removesuffix("_usd"))
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.plot(xs, [x["saved_usd"] or 0.0 for x in ledgers], color="#55a868", marker="o", label="saved by caching")
        ax.set_ylabel("US$")
    else:
        ax.bar(xs, [sum(x["requests"].values()) for x in ledgers], color="#4c72b0", label="teacher+judge requests")
        ax.set_ylabel("requests (not priced)")
    ax.set_xticks(list(xs), labels, rotation=30, fontsize=7)
    ax.set_title(f"{ledgers[-1]['pipeline']}: cost per night" if ledgers else "cost per night")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
