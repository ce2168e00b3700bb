"""Templating + loss masking throughput: synthtune's ChatEncoder against TRL's default per-row path.

Run as: .venv/bin/python bench/template.py [--rows 50000]

Both sides get the same conversations (two user/assistant exchanges each) and the tiny student's
tokenizer (ChatML). The baseline is what TRL's SFTTrainer does by default for conversational data:
`apply_chat_template(messages, tokenize=True, return_dict=True)` once per row (and it then trains
on every token, since its default is not assistant-only). Ours renders the prefixes needed to
locate every assistant turn, tokenizes, and builds the mask (reply + end-of-turn).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    from synthtune.tiny import demo_facts

    facts, rng = demo_facts(), random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(facts, 2)
        out.append([{"role": "user", "content": a["question"]}, {"role": "assistant", "content": a["answer"]},
                    {"role": "user", "content": b["question"]}, {"role": "assistant", "content": b["answer"]}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    from synthtune.chat import ChatEncoder
    from synthtune.models import load_tokenizer

    tok = load_tokenizer("tiny:student")
    data = conversations(args.rows)

    start = time.perf_counter()
    for messages in data:
        tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    trl_s = time.perf_counter() - start

    enc = ChatEncoder(tok)
    start = time.perf_counter()
    out = enc.encode_many([(m, str(i)) for i, m in enumerate(data)])
    ours_s = time.perf_counter() - start
    trained = sum(sum(mask) for _, mask in out) / sum(len(ids) for ids, _ in out)

    print(f"{'path':<44}{'rows/s':>10}{'seconds':>10}")
    print(f"{'TRL default: apply_chat_template per row':<44}{args.rows / trl_s:>10.0f}{trl_s:>10.1f}")
    print(f"{'synthtune: template + assistant mask':<44}{args.rows / ours_s:>10.0f}{ours_s:>10.1f}")
    print(f"ratio synthtune/TRL: {trl_s / ours_s:.2f}x  (rows={args.rows}, trained-token share {trained:.3f}; "
          "TRL's default trains on 1.000)")


if __name__ == "__main__":
    sys.exit(main())
