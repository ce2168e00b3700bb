"""Helpers the tests share: real servers (tests.support.servers), the production-shaped Prefect stack
(tests.support.stack), flow-run queries (tests.support.flows), fault injection into child processes
(tests.support.faults), and test data builders. Fixtures that use them are in tests/conftest.py."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
DEMO = ROOT / "configs" / "demo.yaml"

# offline, quiet and fast-retrying: what every test process and the processes it starts run with
OFFLINE = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_TASK_DEFAULT_RETRY_DELAY_SECONDS": "0",
}
