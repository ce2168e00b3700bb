"""Generation at the teacher's speed: the generate stage's own code path (`generate.run`, an HTTP
teacher) against a hand-written `openai.AsyncOpenAI` + `asyncio.Semaphore(K)` loop and the ideal
N*L/K, side by side in one run, all against one latency-controlled OpenAI-compatible server on
127.0.0.1 (tests/support/latency_server.py: every answer after a fixed latency L, no concurrency limit
of its own, so K requests in flight make K/L rows per second at best).

Run as: .venv/bin/python -m bench.generate [--seeds 4000] [--latency 0.25] [--concurrency 256]

Printed per side: seconds, rows/s, the most requests in flight the server saw, and for the stage the
peak memory of its processes (this one's resident memory, sampled every 50 ms; the server's excluded:
the stage drives its window in-process, with no child). Then a small night on the same root (1% new
seeds): how long after the stage starts its first request leaves, and the whole stage. The last line:
`generate throughput: stage X rows/s, hand-written Y rows/s, ideal Z rows/s, stage/hand-written R, peak M GiB`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def hand_written(url: str, model: str, prompts: list[str], k: int, max_new_tokens: int) -> float:
    """The 30 lines a user would write: AsyncOpenAI as it comes, a semaphore of K; seconds."""
    from openai import AsyncOpenAI

    async def main() -> None:
        client = AsyncOpenAI(base_url=url, api_key="not-needed")
        gate = asyncio.Semaphore(k)

        async def one(prompt: str) -> str:
            async with gate:
                reply = await client.chat.completions.create(model=model, max_tokens=max_new_tokens, temperature=0,
                                                             messages=[{"role": "user", "content": prompt}])
                return reply.choices[0].message.content

        answers = await asyncio.gather(*(one(p) for p in prompts))
        assert len(answers) == len(prompts) and all(answers)
        await client.close()

    start = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - start


def stage(url: str, model: str, seeds: Path, root: Path, k: int, shard_rows: int) -> tuple[float, float, dict]:
    """`generate.run` on a fresh root: (seconds, peak resident GiB of this process, the output's row counts)."""
    import psutil

    from synthtune.config import load_config
    from synthtune.stages import generate
    from synthtune.store import ArtifactStore

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"artifact_root={root}", "generate.teacher_kind=openai", f"generate.teacher={model}",
        f"generate.base_url={url}", f"generate.seeds={seeds}", f"generate.concurrency={k}",
        f"generate.batch_size={shard_rows}"])
    me, peak, done = psutil.Process(), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True)
                                                        if "latency_server" not in " ".join(c.cmdline())))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    ref = generate.run(cfg, ArtifactStore(str(root)))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, peak / 2**30, ref.summary["rows"]


def main() -> None:
    from tests.support.latency_server import MODEL, latency_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4000)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=256, help="generate.batch_size: rows per row-cache shard")
    args = parser.parse_args()
    n, k, latency = args.seeds, args.concurrency, args.latency
    prompts = [f"What is fact number {i} about the island of Vardon?" for i in range(n)]
    with latency_server(latency) as server, tempfile.TemporaryDirectory(prefix="synthtune-bench-") as tmp:
        seeds = Path(tmp) / "seeds.jsonl"
        seeds.write_text("".join(json.dumps({"id": f"s{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        server.control(reset=True)
        seconds, peak, rows = stage(server.url, MODEL, seeds, Path(tmp) / "root", k, args.shard_rows)
        seen = server.stats()
        assert rows["generated"] == n and seen["requests"] == n and not seen["asked_twice"], (rows, seen)
        server.control(reset=True)
        hand = hand_written(server.url, MODEL, [f"{p} (again)" for p in prompts], k, 32)
        hand_seen = server.stats()
        more = max(1, n // 100)  # a small night: 1% new seeds, the rest answered already
        with open(seeds, "a") as f:
            f.write("".join(json.dumps({"id": f"new{i}", "prompt": f"A new question {i}?"}) + "\n" for i in range(more)))
        server.control(reset=True)
        started = time.time()
        small, _, small_rows = stage(server.url, MODEL, seeds, Path(tmp) / "root", k, args.shard_rows)
        first = server.stats()["first_request_at"] - started
        assert small_rows["generated"] == more and server.stats()["requests"] == more, small_rows
    ideal = k / latency
    stage_rate, hand_rate = n / seconds, n / hand
    print(f"{n} seeds, latency {latency} s, {k} requests in flight: ideal {ideal:.0f} rows/s ({n / ideal:.1f} s)")
    print(f"{'side':<14}{'seconds':>9}{'rows/s':>9}{'of ideal':>10}{'max in flight':>15}")
    print(f"{'stage':<14}{seconds:>9.1f}{stage_rate:>9.0f}{stage_rate / ideal:>10.2f}{seen['max_in_flight']:>15}")
    print(f"{'hand-written':<14}{hand:>9.1f}{hand_rate:>9.0f}{hand_rate / ideal:>10.2f}{hand_seen['max_in_flight']:>15}")
    print(f"small night: {more} new of {n + more} seeds, first request {first:.1f} s after the stage started, "
          f"stage done in {small:.1f} s")
    print(f"generate throughput: stage {stage_rate:.0f} rows/s, hand-written {hand_rate:.0f} rows/s, ideal {ideal:.0f} "
          f"rows/s, stage/hand-written {stage_rate / hand_rate:.2f}, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
