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


def demo_preference_pairs(cfg):
    """The demo's facts as DPO pairs (the right answer chosen, a wrong choice rejected), templated on
    `cfg`'s artifact root: the template stage's output."""
    import pandas as pd

    from synthtune.stages import template
    from synthtune.store import ArtifactStore, produce
    from synthtune.tiny import demo_facts

    rows = [{"id": f["id"], "prompt": f["question"], "chosen": f["answer"],
             "rejected": next(c for c in f["choices"] if c != f["answer"])} for f in demo_facts()]
    store = ArtifactStore(cfg.artifact_root)
    pairs = produce(store, "filter", "pairs", {}, {}, lambda st: pd.DataFrame(rows).to_parquet(st.path / "data.parquet"))
    return template.run(cfg, store, {"filter": pairs})


def ray_processes() -> list[str]:
    """Ray's processes alive on this machine (the GCS, raylets, object stores, workers and actors)."""
    import psutil

    names = ("raylet", "gcs_server", "ray::", "plasma_store", "default_worker.py")
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        text = f"{p.info['name']} {' '.join(p.info['cmdline'] or [])}"
        if any(n in text for n in names):
            found.append(text[:100])
    return found
