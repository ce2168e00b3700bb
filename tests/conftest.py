"""Shared fixtures. Everything offline; tiny models built locally (cached in SYNTHTUNE_CACHE); one
real server of each kind per session where tests can share it (helpers in tests.support)."""

from __future__ import annotations

import os

import pytest

from tests.support import DEMO, OFFLINE

for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)


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


@pytest.fixture
def copied(demo_run, tmp_path):
    """The finished demo on a fresh artifact root of its own (a copy: the shared one stays intact)."""
    import shutil

    from synthtune.runner import run_all

    cfg, refs = demo_run
    root = tmp_path / "artifacts"
    shutil.copytree(cfg.artifact_root, root, ignore=shutil.ignore_patterns(".prefect-results", ".locks"))
    cfg = cfg.model_copy(update={"artifact_root": str(root)})
    return cfg, run_all(cfg)  # only preflight runs: its key holds the root it checks


@pytest.fixture(scope="session")
def _prefect_harness():
    """One real Prefect server (SQLite) for the whole flows tier: its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def prefect_server(_prefect_harness):
    """The flows tier's server, and this test's client pointed at it. Per test, not per session: the ops
    tier's stack (its own server) is set up in between, and each test talks to the server it asked for."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: _prefect_harness}):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.rep_call`), for fixtures that act on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def s3_root(tmp_path, monkeypatch):
    """`s3://synthtune-test/root` on a moto S3 server of this test's own; its endpoint and keys are in
    this test's environment (s3fs reads them)."""
    import s3fs

    from tests.support.servers import moto_server

    with moto_server(tmp_path) as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}).mkdir("synthtune-test")
        yield "s3://synthtune-test/root"


@pytest.fixture(scope="session")
def _stack(tmp_path_factory):
    """A real Prefect server on PostgreSQL, pools, process workers and the deployments of
    deployments/prefect.yaml, with an S3-compatible server the flow runs can reach (the ops and ui
    tiers share it)."""
    from tests.support.servers import moto_server
    from tests.support.stack import prefect_stack

    home = tmp_path_factory.mktemp("stack")
    with moto_server(home) as aws:
        os.environ.update(aws)  # this process (s3fs in the tests) and the workers see the same S3
        with prefect_stack(home, str(home / "artifacts"), aws) as s:
            yield s


@pytest.fixture
def stack(_stack):
    """The ops stack, and this test's Prefect client pointed at its server (for this test only: a flows
    test after it talks to the flows tier's server again)."""
    from tests.support.stack import client_env

    with client_env(_stack):
        yield _stack


@pytest.fixture(scope="session")
def served_teacher():
    """The tiny teacher behind a real OpenAI-compatible server, one per session: (base URL, model name)."""
    from synthtune.tiny import ensure
    from tests.support.servers import transformers_serve

    path = str(ensure("teacher"))
    with transformers_serve(path) as url:
        yield url, path
