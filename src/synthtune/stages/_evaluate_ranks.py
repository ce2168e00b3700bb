"""One rank of a data-parallel evaluation (evaluate.num_processes > 1).

Started by `synthtune.stages.evaluate` through torch's launcher (CPU, gloo) or `accelerate launch`
(GPUs) as `python -m synthtune.stages._evaluate_ranks SPEC.json`, in a process group of its own that
dies with the stage. Each rank scores its share of every task with lm-eval and writes how many
requests it scored (`rank-N.json`); rank 0 gathers the results and writes them to `results.json`
beside the spec, and its request counts to `progress.jsonl` (the terminal's bar).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from synthtune import progress
from synthtune.configs import PipelineConfig
from synthtune.stages.evaluate import eval_runtime, harness

STAGE = "evaluate"


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = PipelineConfig.model_validate(spec["cfg"])
    out = Path(spec["out"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if eval_runtime()["device"] == "cpu":  # accelerate forms CPU ranks (gloo) only when asked to
        os.environ["ACCELERATE_USE_CPU"] = "true"
    with open(out / "progress.jsonl", "a") as bar:
        def forward(event: dict) -> None:
            if rank0 and event["kind"] == STAGE:
                bar.write(json.dumps({k: v for k, v in event.items() if k != "kind"}) + "\n")
                bar.flush()

        with progress.listen(forward):
            results, args, share = harness(cfg, Path(spec["adapter"]) if spec["adapter"] else None,
                                           Path(spec["heldout"]) if spec["heldout"] else None)
    (out / f"rank-{share['rank']}.json").write_text(json.dumps(share))  # what this rank scored
    if rank0:  # written whole, then renamed: the parent never reads half a file
        partial = out / "results.json.partial"
        partial.write_text(json.dumps({"results": results, "args": args}, default=str))
        partial.rename(out / "results.json")


if __name__ == "__main__":
    main(sys.argv[1])
