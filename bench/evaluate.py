"""The evaluate stage against the harness itself: two plain `lm_eval` CLI calls, side by side.

Run as: .venv/bin/python -m bench.evaluate

Setup (not timed): the demo runs up to `train` on a fresh artifact root. Then, each as a fresh
process on the same model, adapter and tasks:
  1. `synthtune evaluate` evaluating base and tuned (both missing from the store),
  2. `lm_eval` for the base model + `lm_eval` for the tuned adapter, with the stage's own flags
     (synthtune.stages.evaluate.cli_command),
  3. `synthtune evaluate` again after dropping the tuned result: a nightly run, base scores cached.
Prints seconds, the overhead ratio 1/2 (target <= 1.05) and the saving of 3 over 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    os.environ.update(ENV)
    from synthtune.config import load_config
    from synthtune.eval_tasks import portable_task_dir
    from synthtune.runner import plan, run_all
    from synthtune.stages.evaluate import cli_command, lm_eval_args, own_tasks

    with tempfile.TemporaryDirectory(prefix="synthtune-bench-eval-") as tmp:
        override = f"artifact_root={tmp}/artifacts"
        cfg = load_config(ROOT / "configs" / "demo.yaml", [override])
        refs = run_all(cfg, until="train")
        keys = plan(cfg)
        stage_cmd = [str(BIN / "synthtune"), "evaluate", str(ROOT / "configs" / "demo.yaml"), override]

        ours = timed(stage_cmd)
        include = portable_task_dir(cfg.evaluate.task_dir, Path(tmp) / "tasks")
        cli = 0.0
        for adapter in (None, Path(refs["train"].uri) / "adapter"):
            args = lm_eval_args(cfg, adapter, include)
            args["tasks"] += own_tasks(cfg, include, None)  # the same tasks the stage runs
            cmd = cli_command(args, str(include), f"{tmp}/cli-{adapter is None}")
            cli += timed([str(BIN / "lm_eval"), *cmd[1:]])
        shutil.rmtree(Path(tmp, "artifacts", "evaluate", keys["evaluate[tuned]"]))
        nightly = timed(stage_cmd)

    print(f"{'path':<52}{'seconds':>9}")
    print(f"{'synthtune evaluate (base + tuned, one process)':<52}{ours:>9.1f}")
    print(f"{'lm_eval CLI x2 (base, tuned)':<52}{cli:>9.1f}")
    print(f"{'synthtune evaluate, base cached (nightly)':<52}{nightly:>9.1f}")
    print(f"overhead ratio stage/CLI: {ours / cli:.2f} (target <= 1.05); nightly saving vs CLI x2: "
          f"{1 - nightly / cli:.0%} ({cli / nightly:.2f}x)")


if __name__ == "__main__":
    main()
