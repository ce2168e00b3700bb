"""Templating + loss masking throughput: the template stage's own encoder against TRL's per-row path.

Run as: .venv/bin/python -m bench.template [--rows 50000] [--stage-rows 1000000]

Both sides get the same conversations (two user/assistant exchanges each, as the template stage reads
them) and the tiny student's tokenizer (ChatML). The baselines are what TRL's SFTTrainer does for
conversational data, one `apply_chat_template` per row: by default (`tokenize=True`, training on every
token), and with `assistant_only_loss=True` (the same call with `return_assistant_tokens_mask=True`,
on the template with `{% generation %}` markers it needs). Ours is `stages/template.encode_rows`, the
function the stage runs: render, locate every reply, tokenize in chunks, build the mask (reply +
end-of-turn). The last line is the ratio to TRL's default.

`--stage-rows N` also times the whole stage as a night runs it (`template.run` on a filter output of N
rows: parquet in, encode, length report, histogram, parquet out).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as the product runs (Makefile, CLI): one Rust thread per call

MARKED = (  # the tiny student's ChatML with generation markers, for TRL's assistant_only_loss
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversations(n: int, seed: int = 0) -> list[dict]:
    from synthtune.tiny import demo_facts

    facts, rng = demo_facts(), random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(facts, 2)
        out.append({"id": str(i), "messages": [
            {"role": "user", "content": a["question"]}, {"role": "assistant", "content": a["answer"]},
            {"role": "user", "content": b["question"]}, {"role": "assistant", "content": b["answer"]}]})
    return out


def stage_at_scale(n: int) -> None:
    """The template stage's own `run` over a filter output of n rows (the nightly code path)."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from synthtune.config import load_config
    from synthtune.stages import template
    from synthtune.store import ArtifactStore, produce

    rows = conversations(n)
    with tempfile.TemporaryDirectory(prefix="synthtune-bench-template-") as tmp:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [f"artifact_root={tmp}"])
        store = ArtifactStore(cfg.artifact_root)
        filtered = produce(store, "filter", "bench", {}, {}, lambda st: pd.DataFrame(rows).to_parquet(
            st.path / "data.parquet", index=False))
        start = time.perf_counter()
        ref = template.run(cfg, store, {"filter": filtered})
        secs = time.perf_counter() - start
    print(f"template stage (template.run) on {n:,} rows: {secs:.0f} s ({n / secs:,.0f} rows/s); "
          f"out {ref.summary['rows']['output']:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--stage-rows", type=int, default=0, help="also time the whole stage on this many rows")
    args = parser.parse_args()
    from synthtune.chat import ChatEncoder
    from synthtune.models import load_tokenizer
    from synthtune.stages.template import encode_rows

    tok = load_tokenizer("tiny:student")
    rows = conversations(args.rows)

    start = time.perf_counter()
    for row in rows:
        tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
    trl_s = time.perf_counter() - start

    start = time.perf_counter()
    for row in rows:
        tok.apply_chat_template(row["messages"], chat_template=MARKED, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
    trl_masked_s = time.perf_counter() - start

    enc = ChatEncoder(tok)
    start = time.perf_counter()
    out = [encoded for _, encoded in encode_rows(enc, rows, preference=False)]
    ours_s = time.perf_counter() - start
    trained = sum(sum(mask) for _, mask in out) / sum(len(ids) for ids, _ in out)

    print(f"{'path':<58}{'rows/s':>10}{'seconds':>10}")
    print(f"{'TRL default: apply_chat_template per row (trains all)':<58}{args.rows / trl_s:>10.0f}{trl_s:>10.1f}")
    print(f"{'TRL assistant_only_loss: + assistant mask per row':<58}{args.rows / trl_masked_s:>10.0f}"
          f"{trl_masked_s:>10.1f}")
    print(f"{'synthtune: template stage encode_rows (mask + end-of-turn)':<58}{args.rows / ours_s:>10.0f}{ours_s:>10.1f}")
    print(f"rows={args.rows}, trained-token share {trained:.3f} (TRL's default trains on 1.000); "
          f"vs TRL assistant_only_loss: {trl_masked_s / ours_s:.2f}x")
    if args.stage_rows:
        stage_at_scale(args.stage_rows)
    print(f"ratio synthtune/TRL: {trl_s / ours_s:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
