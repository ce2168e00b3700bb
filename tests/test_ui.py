"""The Prefect UI (V2, at /v2) in headless Chromium, driven the way a user would: Quick run, Custom
run with a changed field, the Artifacts tab, and Retry of a failed run.

The browser is Debian's /usr/bin/chromium (installed by .ci/run), never a Playwright download. It
may not resolve any host but 127.0.0.1 (the UI calls an analytics host). Playwright's sync API keeps
an event loop in this thread, so API checks use Prefect's sync client. On failure a screenshot goes
to test-artifacts/.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support import ROOT
from tests.support.stack import (
    client,
    deployed_config,
    latest_attempt,
    run_state,
    start_run,
    task_runs,
    train_key,
    training_children,
    wait_run,
    with_changes,
)
from tests.test_ops import DATA_STEPS

pytestmark = pytest.mark.ui

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        yield b
        b.close()


@pytest.fixture
def page(browser, stack, request):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(30_000)
    yield pg
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        SHOTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
    pg.close()


def differences(a, b, path: str = "") -> set[str]:
    """Leaf paths of `a` whose value differs in `b` (fields the form adds with their defaults are ignored)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in a for d in differences(a[k], b.get(k), f"{path}.{k}" if path else k)}
    return set() if a == b else {path}


def adapter_of(run_id) -> str:
    """The adapter a run ended with, from its loss-curve artifact."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with client() as c:
        [artifact] = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=["loss-curve"])))
    return re.search(r"Adapter: `([^`]+)`", artifact.data).group(1)


def runs_of(deployment: str) -> set:
    with client() as c:
        dep = c.read_deployment_by_name(deployment)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        return {r.id for r in c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))}


def new_run(deployment: str, before: set, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (fresh := runs_of(deployment) - before):
        assert time.monotonic() < deadline, "the UI created no flow run"
        time.sleep(0.5)
    [run_id] = fresh
    return run_id


def open_deployment(page, stack, name: str) -> None:
    page.goto(f"{stack.ui_url}/v2/deployments", wait_until="networkidle")
    page.get_by_role("link", name=name, exact=True).click()
    page.get_by_role("tab", name="Runs").wait_for()


def create_run(page, open_form, submit: str):
    """Open a run form (`open_form()` returns its scope), submit it, and return the new run's id."""
    before = runs_of("synthtune/adhoc")
    form = open_form()
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/create_flow_run"),
                              timeout=60_000) as response:
        form.get_by_role("button", name=submit, exact=True).click()
    assert response.value.status < 400, f"creating the run failed: HTTP {response.value.status}"
    return new_run("synthtune/adhoc", before)


def quick_run(page, stack):
    """Deployment `adhoc` -> Run -> Quick run -> confirm the deployment's parameters; the new run's id."""
    def open_form():
        open_deployment(page, stack, "adhoc")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Quick run").click()
        dialog = page.get_by_role("dialog", name="Run Deployment")
        dialog.get_by_label("Student", exact=True).wait_for()
        return dialog

    return create_run(page, open_form, "Run")


def custom_run(page, stack, fields: dict[str, str], select: dict[str, str] | None = None):
    """Deployment `adhoc` -> Run -> Custom run; fill fields by their form labels, pick enum options;
    submit; the new run's id."""
    def open_form():
        open_deployment(page, stack, "adhoc")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Custom run").click()
        for label, value in fields.items():
            page.get_by_label(label, exact=True).fill(value)
        for name, option in (select or {}).items():  # enum fields: a listbox button named "Select <field>"
            page.get_by_role("button", name=f"Select {name}", exact=True).click()
            page.get_by_role("option", name=option, exact=True).click()
        return page

    return create_run(page, open_form, "Submit")


def test_quick_run_and_custom_run_complete_with_their_parameters(page, stack):
    with client() as c:
        defaults = c.read_deployment_by_name("synthtune/adhoc").parameters

    quick = quick_run(page, stack)
    custom = custom_run(page, stack, {"R (Optional)": "8"})
    for run_id in (quick, custom):
        run = wait_run(run_id, timeout=900)
        assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-gpu")[-3000:])
    with client() as c:
        quick_params, custom_params = c.read_flow_run(quick).parameters, c.read_flow_run(custom).parameters
    # the form sends every field, the deployment's values where it has them and the defaults elsewhere
    assert differences(defaults["config"], quick_params["config"]) == set()
    assert {k: v for k, v in quick_params.items() if k != "config"} == {"gpu_deployment": "", "gpu_slot": "",
                                                                       "fail_stage": "none", "refresh": []}
    assert custom_params["config"]["train"]["lora"]["r"] == 8
    assert differences(defaults["config"], custom_params["config"]) == {"train.lora.r"}
    assert adapter_of(custom) != adapter_of(quick)  # r=8 is another adapter (trained now, or cached earlier)

    # the run page's Artifacts tab lists the eval comparison; its page shows the table
    page.goto(f"{stack.ui_url}/v2/runs/flow-run/{quick}", wait_until="networkidle")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("eval-comparison", exact=True).click()
    page.get_by_role("cell", name="demo_facts").first.wait_for()
    table = page.get_by_role("table").inner_text()
    assert "base" in table and "tuned" in table and re.search(r"\bacc\b", table)

    # the custom run trained: its loss curve is a picture the UI shows (embedded, no file access needed)
    page.goto(f"{stack.ui_url}/v2/runs/flow-run/{custom}", wait_until="networkidle")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("loss-curve", exact=True).click()
    image = page.get_by_role("img", name="loss")
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())


def test_retry_in_the_ui_reruns_only_the_failed_stage_and_what_follows(page, stack):
    run_id = custom_run(page, stack, {"Learning Rate (Optional)": "0.0025"}, select={"fail_stage": "train"})
    failed = wait_run(run_id, timeout=900)
    assert failed.state.type.value == "FAILED", failed.state
    first = {n: r.state.name for n, r in task_runs(run_id).items()}
    assert first["train"] == "Failed" and "promote" not in first

    page.goto(f"{stack.ui_url}/v2/runs/flow-run/{run_id}", wait_until="networkidle")
    page.get_by_role("button", name="Open menu").first.click()
    page.get_by_role("menuitem", name="Retry").click()
    page.get_by_role("alertdialog").get_by_role("button", name="Retry").click()
    wait_run(run_id, timeout=60, states={"SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "CRASHED", "CANCELLED"})
    # the run page streams the run's logs; left open on 2 cores it starved training (218 s instead of 4)
    page.goto("about:blank")

    run = wait_run(run_id, timeout=900, states={"COMPLETED", "CRASHED", "CANCELLED"})
    assert run.state.type.value == "COMPLETED", (run.state, stack.log("worker-gpu")[-3000:])
    latest = latest_attempt(run_id)
    assert {latest[n] for n in DATA_STEPS} == {"Cached"}, latest
    assert latest["train"] == "Completed" and latest["evaluate[tuned]"] == "Completed"
    assert latest["evaluate[base]"] == "Cached"
    page.goto(f"{stack.ui_url}/v2/runs/flow-run/{run_id}", wait_until="networkidle")
    page.get_by_text(run.state.name, exact=True).first.wait_for()  # Completed, or NotPromoted when the gate said no


def test_cancel_in_the_ui_kills_the_training_child_and_frees_the_gpu_slot(page, stack):
    config = with_changes(deployed_config(stack), train={"seed": 7, "epochs": 100000})
    run_id = start_run("synthtune/adhoc", {"config": config})
    key = train_key(config, run_id)
    deadline = time.monotonic() + 600
    while not (children := training_children(key)):
        assert time.monotonic() < deadline, "training never started"
        assert run_state(run_id) in {"RUNNING", "PENDING", "SCHEDULED"}, run_state(run_id)
        time.sleep(1)
    page.goto(f"{stack.ui_url}/v2/runs/flow-run/{run_id}", wait_until="networkidle")
    page.get_by_role("button", name="Open menu").first.click()
    page.get_by_role("menuitem", name="Cancel").click()
    page.get_by_role("alertdialog").get_by_role("button", name="Cancel Flow Run").click()

    run = wait_run(run_id, timeout=180)
    assert run.state.type.value == "CANCELLED", run.state
    deadline = time.monotonic() + 60
    while any(p.is_running() and p.status() != "zombie" for p in children):
        assert time.monotonic() < deadline, f"training child still alive: {[p.pid for p in children]}"
        time.sleep(0.5)
    deadline = time.monotonic() + 180  # the slot was released (or its lease ran out)
    with client() as c:
        while c.read_global_concurrency_limit_by_name("gpu:test-worker").active_slots:
            assert time.monotonic() < deadline, "GPU slot still held after the cancelled run"
            time.sleep(2)
