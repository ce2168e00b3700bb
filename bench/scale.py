"""Training and evaluation on 1 vs 2 processes (train.num_processes, evaluate.num_processes), side by side
in one run, through the stages themselves (`synthtune.stages.train.run`: the launcher, the ranks, the
adapter written once; `synthtune.stages.evaluate.run`: lm-eval data-parallel, rank 0 gathering).

Run as: .venv/bin/python -m bench.scale [--epochs 20]

The demo's rows (built first, as `synthtune run` would) are trained at the same global batch on one
process and on two ranks (torch's launcher and gloo on a CPU; `accelerate launch` on GPUs). Printed:
wall seconds of the stage, the speed-up, the largest difference between the two loss curves, and the
peak memory of every rank (resident set on a CPU, allocated CUDA memory on a GPU). On a 2-core machine
expect little speed-up: two ranks share the two cores; the figures that matter here are correctness
and the overhead. Then the tuned adapter is evaluated (the demo task and the forgetting sample) on one
process and on two ranks: wall seconds, speed-up, whether the scores are identical, and each rank's
requests and peak memory (with one process, the peak of this whole benchmark process).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=20)
    args = parser.parse_args()

    from synthtune.config import load_config
    from synthtune.runner import run_all
    from synthtune.stages import evaluate, train
    from synthtune.store import ArtifactStore

    with tempfile.TemporaryDirectory(prefix="synthtune-bench-scale-") as tmp:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"artifact_root={tmp}/artifacts", f"train.epochs={args.epochs}",
                                                           "train.batch_size=4", "train.gradient_accumulation_steps=2",
                                                           "train.logging_steps=2"])
        template = run_all(cfg, until="template")["template"]
        store = ArtifactStore(cfg.artifact_root)
        seen = {}
        for n in (1, 2):
            c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_processes": n})})
            start = time.perf_counter()
            ref = train.run(c, store, {"template": template}, output_key=f"bench-scale-{n}")
            seconds = time.perf_counter() - start
            losses = [h["loss"] for h in json.loads(Path(ref.uri, "loss_history.json").read_text()) if "loss" in h]
            seen[n] = (seconds, losses, ref.summary["ranks"], ref.summary["steps"])
        print(f"train, demo rows, {args.epochs:g} epochs, global batch 8 ({seen[1][3]} optimizer steps)")
        for n, (seconds, _, ranks, _) in seen.items():
            memory = ", ".join(f"rank {r['rank']}: {r['peak_rss_gib']:.2f} GiB RSS"
                               + (f", {r['peak_gpu_memory_gib']:.2f} GiB GPU" if r.get("peak_gpu_memory_gib") else "")
                               + f", {r['examples']} examples" for r in ranks)
            print(f"  {n} process{'es' if n > 1 else ''}: {seconds:6.1f} s   ({memory})")
        print(f"  speed-up 2 vs 1: {seen[1][0] / seen[2][0]:.2f}x")
        diff = max(abs(a - b) / a for a, b in zip(seen[1][1], seen[2][1], strict=True))
        print(f"  loss curves: largest relative difference {diff:.2e} over {len(seen[1][1])} logged steps")

        adapter = store.ref("train", "bench-scale-1")
        scored = {}
        for n in (1, 2):
            c = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"num_processes": n})})
            start = time.perf_counter()
            ref = evaluate.run(c, store, {"train": adapter}, output_key=f"bench-scale-eval-{n}")
            scored[n] = (time.perf_counter() - start, ref.summary["scores"], ref.summary["ranks"])
        print(f"evaluate, the tuned adapter on {', '.join(scored[1][1])}")
        for n, (seconds, _, ranks) in scored.items():
            shares = ", ".join(f"rank {r['rank']}: {r['requests']} requests, {r['peak_rss_gib']:.2f} GiB RSS" for r in ranks)
            print(f"  {n} process{'es' if n > 1 else ''}: {seconds:6.1f} s   ({shares})")
        print(f"  speed-up 2 vs 1: {scored[1][0] / scored[2][0]:.2f}x")
        print(f"  scores identical: {scored[1][1] == scored[2][1]}")


if __name__ == "__main__":
    main()
