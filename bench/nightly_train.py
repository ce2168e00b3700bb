"""Nightly training, two policies side by side in one run: retrain from base on all history every night,
against continuing the champion on what is new plus a replay sample.

Run as: .venv/bin/python -m bench.nightly_train [--nights 4]

The demo's 32 facts arrive over the nights, a quarter of the seed file each night, into a seed folder.
Each policy has its own artifact root and runs the whole loop every night (`run_all`, the product's
code path: generate asks only for new seeds, the gate decides what is in service, and a continued
night starts from whatever is in service). Printed per policy and night: where training started,
optimizer steps, tokens trained (row tokens x epochs), the train stage's wall time, and accuracy on the
facts seen so far, from lm-eval's per-item samples of tonight's candidate (evaluate[tuned]), filtered
to the seen facts. The last line holds the ratios (targets: night-4 tokens <= 0.35, seen-fact
accuracy continued >= full - 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)

# the two policies, as config overrides on the demo
FULL = ["train.init=base", "train.data=all"]
CONTINUED = ["train.init=champion", "train.data=new", "train.replay=0.5"]


def night_seeds(folder: Path, night: int, nights: int) -> list[str]:
    """Write night `night`'s seed file (the next share of the demo's seeds); the seed ids seen so far."""
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "seeds" / "demo.jsonl").read_text().splitlines()
            if line.strip()]
    share = -(-len(rows) // nights)
    folder.mkdir(parents=True, exist_ok=True)
    part = rows[(night - 1) * share:night * share]
    (folder / f"night{night}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return [r["id"] for r in rows[:night * share]]


def seen_accuracy(store, evaluate_key: str, seen: set[str]) -> float:
    """Accuracy of an evaluation on the seen facts only, from lm-eval's per-item samples."""
    text = store.fs.cat_file(store.path("evaluate", evaluate_key, "samples_demo_facts.jsonl")).decode()
    hits = [float(s["acc"]) for s in map(json.loads, text.splitlines()) if s["doc"]["id"] in seen]
    return sum(hits) / len(hits)


def one_night(policy: list[str], root: Path, seeds: Path, seen: set[str]) -> dict:
    from synthtune.config import load_config
    from synthtune.runner import run_all
    from synthtune.store import ArtifactStore

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"artifact_root={root}", f"generate.seeds={seeds}", *policy])
    refs = run_all(cfg)
    metrics = refs["train"].summary  # the manifest's summary: its rows and its metrics
    rows = metrics["rows"]
    return {"start": "base" if metrics.get("init", "base") == "base" else "champion",
            "rows": rows["trained"], "new": rows.get("new"), "replay": rows.get("replay"),
            "steps": metrics["optimizer_steps"], "tokens": metrics["tokens_trained"],
            "seconds": metrics["seconds"], "promoted": refs["promote"].summary.get("promoted"),
            "acc": seen_accuracy(ArtifactStore(cfg.artifact_root), refs["evaluate[tuned]"].key, seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--continued", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="extra overrides for the continued policy (to tune it)")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    results: dict[str, list[dict]] = {"full": [], "continued": []}
    with tempfile.TemporaryDirectory(prefix="synthtune-bench-nightly-train-") as tmp:
        tmp = Path(tmp)
        for night in range(1, args.nights + 1):
            seen = set(night_seeds(tmp / "seeds", night, args.nights))
            for name, policy in (("full", FULL), ("continued", [*CONTINUED, *args.continued])):
                results[name].append(one_night(policy, tmp / name, tmp / "seeds", seen))
    print(f"continued policy: {' '.join([*CONTINUED, *args.continued])}")
    print(f"{'policy':<11}{'night':>6}{'start':>10}{'rows':>6}{'new':>5}{'replay':>7}{'steps':>7}{'tokens':>9}"
          f"{'train s':>9}{'seen acc':>10}{'promoted':>10}")
    for name, nights in results.items():
        for n, r in enumerate(nights, 1):
            print(f"{name:<11}{n:>6}{r['start']:>10}{r['rows']:>6}{r['new'] or 0:>5}{r['replay'] or 0:>7}"
                  f"{r['steps']:>7}{r['tokens']:>9}{r['seconds']:>9.1f}{r['acc']:>10.3f}{str(r['promoted']):>10}")
    full, cont = results["full"], results["continued"]
    last = cont[-1]["tokens"] / full[-1]["tokens"]
    total = sum(r["tokens"] for r in cont) / sum(r["tokens"] for r in full)
    print(f"nightly training: night-{args.nights} tokens continued/full {last:.3f}, cumulative tokens continued/full "
          f"{total:.3f}, seen-fact accuracy continued {cont[-1]['acc']:.3f} vs full {full[-1]['acc']:.3f}")


if __name__ == "__main__":
    main()
