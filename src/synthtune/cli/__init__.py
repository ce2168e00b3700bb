"""The `synthtune` command: run the loop, validate a config, run one stage, look after the registry,
deploy. One small module per group of commands; what they print is drawn by synthtune.terminal.

Run as: synthtune run                      (the demo: configs/demo.yaml on the embedded Prefect)
        synthtune run CONFIG a.b.c=value   (any pipeline, with overrides)
        synthtune validate CONFIG          (every field and referenced file, before any GPU time)
"""

from __future__ import annotations

import os

from synthtune.cli import cost, deploy, fields, registry, run, stages  # each registers its commands on `app`
from synthtune.cli.common import app

__all__ = ["app", "cost", "deploy", "fields", "main", "registry", "run", "stages"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
