"""Three nights of generation, side by side in one run: synthtune's generate stage (row-level cache on
the artifact root, the HTTP teacher driven through its request window) against what a distilabel user
does (one pipeline per night, distilabel's own cache on).

Run as: .venv/bin/python -m bench.nightly [--seeds 200]

Night 1 asks for N seeds; night 2 for the same N plus 10% new ones (a new seed file); night 3 changes
nothing. Both sides talk to the same real OpenAI-compatible teacher (`transformers serve` with the tiny
teacher) through a hop that counts generation requests. Printed per side and night: teacher requests,
rows out and wall time of the stage; then the ratio of night-2 to night-1 requests (target for
synthtune: <= 0.12).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def seed_rows(n: int, start: int = 0) -> list[dict]:
    from synthtune.tiny import demo_facts

    facts = demo_facts()
    return [{"id": f"s{i}", "prompt": f"{facts[i % len(facts)]['question']} ({i})"} for i in range(start, start + n)]


def ours(folder: Path, root: Path, url: str, model: str, night: int) -> int:
    """One night of the generate stage (the product's code path); returns its output rows."""
    from synthtune.config import load_config
    from synthtune.stages import generate
    from synthtune.store import ArtifactStore

    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"artifact_root={root}", f"generate.seeds={folder}", "generate.teacher_kind=openai",
        f"generate.teacher={model}", f"generate.base_url={url}", "generate.batch_size=16"])
    return generate.run(cfg, ArtifactStore(cfg.artifact_root)).summary["rows"]["output"]


def distilabel_user(rows: list[dict], cache_dir: Path, url: str, model: str) -> int:
    """One night as a distilabel user writes it: the same pipeline every night, its cache on."""
    from distilabel.models.llms import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    with Pipeline(name="nightly-teacher", cache_dir=str(cache_dir)) as pipeline:
        load = LoadDataFromDicts(data=[{"id": r["id"], "instruction": r["prompt"]} for r in rows], batch_size=16)
        gen = TextGeneration(llm=OpenAILLM(model=model, base_url=url, api_key="not-needed",
                                           generation_kwargs={"max_new_tokens": 32, "temperature": 0.0}),
                             input_batch_size=16)
        load >> gen
    distiset = pipeline.run(use_cache=True)
    return len(distiset["default"]["train"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    args = parser.parse_args()
    from synthtune.tiny import ensure
    from tests.support.servers import FaultyHop, transformers_serve

    n, more = args.seeds, max(1, args.seeds // 10)
    results: dict[str, list[tuple[int, int, float]]] = {"synthtune": [], "distilabel": []}
    with tempfile.TemporaryDirectory(prefix="synthtune-bench-nightly-") as tmp, \
            transformers_serve(str(ensure("teacher"))) as base:
        tmp = Path(tmp)
        hop = FaultyHop(base, [])
        model = str(ensure("teacher"))
        nights = [seed_rows(n), seed_rows(n) + seed_rows(more, start=n), seed_rows(n) + seed_rows(more, start=n)]
        try:
            for night, rows in enumerate(nights, 1):
                folder = tmp / "seeds"
                folder.mkdir(exist_ok=True)
                if night < 3:  # night 3: no new file
                    (folder / f"night{night}.jsonl").write_text(
                        "".join(json.dumps(r) + "\n" for r in rows[len(nights[0]) if night == 2 else 0:]))
                for side in ("synthtune", "distilabel"):
                    hop.posts = 0
                    start = time.perf_counter()
                    if side == "synthtune":
                        out = ours(folder, tmp / "artifacts", hop.url, model, night)
                    else:
                        out = distilabel_user(rows, tmp / "distilabel-cache", hop.url, model)
                    results[side].append((hop.posts, out, time.perf_counter() - start))
        finally:
            hop.close()
    print(f"{'side':<12}{'night':>6}{'seeds':>7}{'requests':>10}{'rows out':>10}{'seconds':>9}")
    for side, nights_run in results.items():
        for night, (posts, out, secs) in enumerate(nights_run, 1):
            print(f"{side:<12}{night:>6}{n + (more if night > 1 else 0):>7}{posts:>10}{out:>10}{secs:>9.1f}")
    if results["distilabel"][1][1] != n + more:
        print(f"note: distilabel's night 2 returned {results['distilabel'][1][1]} rows for {n + more} seeds "
              "(its cache restored the night-1 step and did not see the new input)")
    ratio = {side: r[1][0] / r[0][0] for side, r in results.items()}
    print(f"nightly teacher-request ratio night2/night1: {ratio['synthtune']:.3f} (distilabel: {ratio['distilabel']:.3f})")


if __name__ == "__main__":
    main()
