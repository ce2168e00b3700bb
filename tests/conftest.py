"""Shared fixtures. Everything offline; tiny models built locally (cached in SYNTHTUNE_CACHE)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

OFFLINE = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_TASK_DEFAULT_RETRY_DELAY_SECONDS": "0",
}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tasks/ and flows/ are not installed: import them from the checkout
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture
def demo_cfg(tmp_path):
    """The demo config writing into a fresh artifact root."""
    from synthtune.config import load_config

    return load_config(DEMO, [f"artifact_root={tmp_path / 'artifacts'}"])


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from synthtune.models import load_tokenizer

    return load_tokenizer("tiny:student")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The whole demo loop, run once per session without Prefect (the `local` engine)."""
    from synthtune.config import load_config
    from synthtune.runner import run_all

    root = tmp_path_factory.mktemp("demo") / "artifacts"
    cfg = load_config(DEMO, [f"artifact_root={root}"])
    return cfg, run_all(cfg)
