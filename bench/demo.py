"""The demo, first run vs cached rerun, side by side in one process: wall time, ratio, peak memory.

Run as: .venv/bin/python -m bench.demo            (cold: tiny models built too)
        .venv/bin/python -m bench.demo --warm     (reuse the tiny-model cache)

Each run is `synthtune run` in a subprocess on a fresh artifact root; peak memory is the largest
sum of RSS over the whole process tree (CLI, embedded Prefect server, distilabel workers), sampled
every 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SYNTHTUNE = Path(sys.executable).parent / "synthtune"


def measure(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak tree RSS in GiB, output) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return time.perf_counter() - start, peak / 2**30, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true", help="reuse the tiny-model cache instead of building anew")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="synthtune-bench-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": f"{tmp}/prefect"}
        if not args.warm:
            env["SYNTHTUNE_CACHE"] = f"{tmp}/cache"
        cmd = [str(SYNTHTUNE), "run", f"artifact_root={tmp}/artifacts"]
        first, first_mem, _ = measure(cmd, env)
        cached, cached_mem, _ = measure(cmd, env)
        verdict = json.loads(next(Path(tmp, "artifacts", "promote").glob("*/verdict.json")).read_text())
    print(f"{'run':<14}{'seconds':>10}{'peak GiB':>10}")
    print(f"{'first':<14}{first:>10.1f}{first_mem:>10.2f}")
    print(f"{'cached rerun':<14}{cached:>10.1f}{cached_mem:>10.2f}")
    print(f"ratio first/cached: {first / cached:.1f}x   (targets: first <= 300 s, peak < 4 GiB)")
    print(f"tiny models: {'reused' if args.warm else 'built in the first run'}")
    print(("promoted: " if verdict["promoted"] else "NOT promoted: ") + "; ".join(verdict["reasons"]))


if __name__ == "__main__":
    main()
