"""What a night costs (synthtune.ledger) and the budgets that stop a runaway night (synthtune.budget).

The ledger against a real teacher behind the counting hop is in test_teacher_http.py; the night-cost
artifacts of a Prefect run in test_flows.py."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtune import ledger
from synthtune.budget import BudgetError
from synthtune.stages import generate
from synthtune.store import ArtifactStore, produce
from synthtune.usage import NO_DEVICE


class Counter:
    """An HTTP server on 127.0.0.1 where a teacher would be, counting what reaches it: it lists the model
    (`GET /models`: preflight's probe passes) and answers every generation request 503, so a request
    that gets through shows as a POST here and a failed generation there."""

    def __init__(self):
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits.append(f"GET {self.path}")
                body = json.dumps({"data": [{"id": "hosted-teacher"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.hits.append(f"POST {self.path}")
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def posts(self) -> int:
        return sum(h.startswith("POST") for h in self.hits)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def counter():
    c = Counter()
    yield c
    c.close()


def _seed_folder(folder: Path, sizes: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        (folder / name).write_text("".join(json.dumps({"id": f"{name}-{i}", "prompt": f"What is fact {i} of {name}?"})
                                           + "\n" for i in range(n)))
    return folder


def _http(cfg, base_url, seeds, **cost):
    gen = cfg.generate.model_copy(update={"teacher_kind": "openai", "teacher": "hosted-teacher", "base_url": base_url,
                                          "seeds": str(seeds), "max_retries": 0, "timeout_s": 2.0})
    return cfg.model_copy(update={"generate": gen, "cost": cfg.cost.model_copy(update=cost)})


def test_a_seed_folder_ten_times_the_budget_stops_before_the_first_request(demo_cfg, tmp_path, counter):
    seeds = _seed_folder(tmp_path / "seeds", {"big_export.jsonl": 32, "usual.jsonl": 8})
    cfg = _http(demo_cfg, counter.url, seeds, max_teacher_requests=4)
    store = ArtifactStore(cfg.artifact_root)
    with pytest.raises(BudgetError) as e:
        generate.run(cfg, store)
    message = str(e.value)
    assert "40 requests (40 to the teacher, 0 to the judge) > cost.max_teacher_requests=4" in message
    assert "big_export.jsonl (32 new), usual.jsonl (8 new)" in message  # the files responsible, the worst first
    assert "--allow-over-budget" in message and counter.hits == []  # nothing was asked, not even /models
    assert store.ref("generate", generate.key(cfg, {})) is None

    allowed = cfg.model_copy(update={"cost": cfg.cost.model_copy(update={"allow_over_budget": True})})
    with pytest.raises(generate.GenerationError, match="the teacher gave up on 40 of 40 requests"):
        generate.run(allowed, store)  # past the budget: every request is sent (and this server refuses them)
    assert counter.posts == 40


def test_the_budget_counts_only_what_the_row_cache_lacks(demo_cfg, tmp_path, counter):
    """Answers already made are free: with 36 of 40 in the row cache, 4 requests fit a budget of 4."""
    from synthtune.generation import planned
    from synthtune.rowcache import RowCache
    from synthtune.seeds import read_seeds
    from synthtune.teacher import answer_key

    seeds = _seed_folder(tmp_path / "seeds", {"big_export.jsonl": 32, "usual.jsonl": 8})
    cfg = _http(demo_cfg, counter.url, seeds, max_teacher_requests=4)
    store = ArtifactStore(cfg.artifact_root)
    rows = read_seeds(cfg.generate.seeds, cfg.generate.prompt_field).rows
    teacher = f"openai:{counter.url}:hosted-teacher"
    RowCache(f"{generate.cache_url(store)}/answers").write(
        [{"key": answer_key(cfg.generate, teacher, r["instruction"], 0), "generation": "cached", "model_name": "t"}
         for r in rows[:36]])
    plan = planned(cfg.generate, rows, {"teacher": teacher}, generate.cache_url(store))
    assert plan["teacher"] == 4 and plan["by_file"] == {"usual.jsonl": 4}
    tight = cfg.model_copy(update={"cost": cfg.cost.model_copy(update={"max_teacher_requests": 3})})
    with pytest.raises(BudgetError, match=r"4 requests .* > cost.max_teacher_requests=3"):
        generate.run(tight, store)
    assert RowCache(f"{generate.cache_url(store)}/answers").size() == 36  # nothing made before is lost
    with pytest.raises(generate.GenerationError, match="the teacher gave up on 4 of 4 requests"):
        generate.run(cfg, store)  # within the budget: the four are asked for
    assert counter.posts == 4


def test_a_dollar_budget_needs_prices_and_stops_an_expensive_night(demo_cfg, tmp_path, counter):
    seeds = _seed_folder(tmp_path / "seeds", {"s.jsonl": 10})
    unpriced = _http(demo_cfg, counter.url, seeds, max_teacher_usd=1.0)
    with pytest.raises(BudgetError, match=r"cost.max_teacher_usd is set but the teacher has no price"):
        generate.run(unpriced, ArtifactStore(unpriced.artifact_root))
    # 10 requests x max_new_tokens completion tokens at $1,000 per million: over $0.01
    pricey = _http(demo_cfg, counter.url, seeds, max_teacher_usd=0.01, teacher_usd_per_m_prompt=1000.0,
                   teacher_usd_per_m_completion=1000.0)
    with pytest.raises(BudgetError, match=r"an estimated \$\d+\.\d\d > cost.max_teacher_usd=\$0.01"):
        generate.run(pricey, ArtifactStore(pricey.artifact_root))
    assert counter.hits == []


def test_the_cli_flag_lets_an_over_budget_night_go_on(demo_cfg, tmp_path, counter):
    from synthtune.cli import app
    from tests.conftest import DEMO

    seeds = _seed_folder(tmp_path / "seeds", {"big_export.jsonl": 20})
    args = ["generate", str(DEMO), f"artifact_root={tmp_path / 'a'}", "generate.teacher_kind=openai",
            "generate.teacher=hosted-teacher", f"generate.base_url={counter.url}", f"generate.seeds={seeds}",
            "generate.max_retries=0", "cost.max_teacher_requests=2"]
    refused = CliRunner().invoke(app, args)  # preflight probes /models; generate stops before any request
    assert refused.exit_code != 0 and isinstance(refused.exception, BudgetError), refused.output
    assert "big_export.jsonl (20 new)" in str(refused.exception) and counter.posts == 0
    allowed = CliRunner().invoke(app, [*args, "--allow-over-budget"])
    assert allowed.exit_code != 0 and "the teacher gave up on 20 of 20 requests" in str(allowed.exception)
    assert counter.posts == 20


# ---------------------------------------------------------------- the ledger


def _built(store, stage, key, calls=None):
    def build(staging):
        (staging.path / "x.txt").write_text(key)
        if calls:
            staging.usage["calls"] = calls

    return produce(store, stage, key, {}, {}, build)


def test_a_cached_step_costs_nothing_and_its_first_cost_is_the_saving(demo_cfg, tmp_path):
    cfg = demo_cfg.model_copy(update={"artifact_root": str(tmp_path / "a"), "cost": demo_cfg.cost.model_copy(update={
        "teacher_usd_per_m_prompt": 2.0, "teacher_usd_per_m_completion": 8.0, "judge_usd_per_m_prompt": 1.0,
        "gpu_usd_per_hour": {"default": 3.0}})})
    store = ArtifactStore(cfg.artifact_root)
    calls = {"teacher": {"requests": 12, "retries": 2, "prompt_tokens": 100_000, "completion_tokens": 50_000},
             "judge": {"requests": 10, "retries": 0, "prompt_tokens": 200_000, "completion_tokens": 1_000}}
    first = {"generate": _built(store, "generate", "g1", calls), "train": _built(store, "train", "t1")}
    night = ledger.night(cfg, first, "run-1")
    generate_line, train_line = night["steps"]
    # teacher 0.1 M x $2 + 0.05 M x $8; judge 0.2 M x $1 + 0.001 M x $8 (the teacher's completion price)
    assert generate_line["teacher_usd"] == pytest.approx(0.6) and generate_line["judge_usd"] == pytest.approx(0.208)
    assert night["usd"] == pytest.approx(0.808) and night["saved_usd"] == 0.0
    assert night["requests"] == {"teacher": 12, "judge": 10, "rejected": 0} and night["retries"] == 2
    # on this CPU machine: no device-hours, labelled, never a zero that looks measured
    assert train_line["gpu_hours"] is None and train_line["gpu_absent"] == NO_DEVICE
    assert night["gpu_hours"] is None and night["gpu_absent"] == NO_DEVICE
    assert "GPU absent (no CUDA device on this machine)" in ledger.summary_line(night)

    second = {"generate": _built(store, "generate", "g1"), "train": _built(store, "train", "t2")}
    assert second["generate"].reused and not second["train"].reused
    again = ledger.night(cfg, second, "run-2")
    assert again["steps"][0]["cached"] and again["steps"][0]["usd"] == 0.0
    assert again["steps"][0]["saved_requests"] == 22 and again["requests"]["teacher"] == 0
    assert again["usd"] == 0.0 and again["saved_usd"] == pytest.approx(0.808)
    assert "cost $0.00; saved by caching $0.8080" in ledger.summary_line(again)


def test_gpu_device_hours_are_priced_by_work_pool(demo_cfg):
    cfg = demo_cfg.model_copy(update={"cost": demo_cfg.cost.model_copy(update={
        "gpu_usd_per_hour": {"h100-pool": 4.0, "default": 1.0}})})
    usage = {"wall_s": 1800, "gpu": {"devices": 2, "device_seconds": 3600.0}, "pool": "h100-pool"}
    assert ledger.priced(usage, cfg)["gpu_usd"] == pytest.approx(4.0)  # 2 devices x half an hour x $4
    assert ledger.priced({**usage, "pool": "elsewhere"}, cfg)["gpu_usd"] == pytest.approx(1.0)
    assert ledger.priced({**usage, "gpu": None}, cfg)["gpu_usd"] is None
    assert ledger.priced(usage, demo_cfg)["usd"] is None  # no prices: counted, never money


def test_a_budget_or_a_price_is_in_no_cache_key(demo_cfg):
    from synthtune.runner import DAG

    priced = demo_cfg.model_copy(update={"cost": demo_cfg.cost.model_copy(update={
        "max_gpu_hours": 0.5, "max_teacher_requests": 3, "teacher_usd_per_m_prompt": 1.0, "allow_over_budget": True})})
    for step in DAG:
        assert step.stage.key(priced, {}) == step.stage.key(demo_cfg, {}), step.name


# ---------------------------------------------------------------- the GPU-hours budget, on a real training


@pytest.mark.integration
def test_the_gpu_budget_stops_training_at_a_checkpoint_and_a_retry_with_more_resumes(demo_run):
    from synthtune.stages import train
    from synthtune.stages.train import latest_valid_checkpoint, work_dir

    cfg, refs = demo_run
    capped = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"max_steps": 30, "save_steps": 10, "logging_steps": 10, "seed": 11}),
        "cost": cfg.cost.model_copy(update={"max_gpu_hours": 1e-7})})  # a third of a millisecond: over at once
    store = ArtifactStore(cfg.artifact_root)
    k = train.key(capped, {"template": refs["template"].digest})
    with pytest.raises(BudgetError, match=r"over the GPU budget: training used 0\.\d+ device-hours \(1 cpu\) > "
                                          r"cost.max_gpu_hours=1e-07; it stopped at its checkpoint at step 10 \("):
        train.run(capped, store, {"template": refs["template"]})
    work = work_dir(store, k)
    assert latest_valid_checkpoint(work / "checkpoints").name == "checkpoint-10" and store.ref("train", k) is None
    used = json.loads((work / "hours.json").read_text())["hours"]
    assert used > 1e-7

    more = capped.model_copy(update={"cost": capped.cost.model_copy(update={"max_gpu_hours": 1.0})})
    assert train.key(more, {"template": refs["template"].digest}) == k  # the same training, resumed
    ref = train.run(more, store, {"template": refs["template"]})
    assert ref.summary["resumed_from_step"] == 10 and ref.summary["first_step_this_run"] == 11
    assert ref.summary["steps"] == 30 and not work.exists()


@pytest.mark.integration
def test_the_demo_night_has_a_ledger_the_cost_command_and_models_show(demo_run, monkeypatch):
    from synthtune.cli import app
    from synthtune.cli.common import console
    from tests.conftest import DEMO

    cfg, refs = demo_run
    [night] = [x for x in ledger.history(ArtifactStore(cfg.artifact_root), cfg.name) if x["train_key"] == refs["train"].key
               and not next(s for s in x["steps"] if s["step"] == "train")["cached"]][:1]
    teacher = next(s for s in night["steps"] if s["step"] == "generate")["calls"]["teacher"]
    assert teacher["requests"] == refs["generate"].summary["rows"]["generated"] > 0 and teacher["tokens"] == "tokenizer"
    assert teacher["prompt_tokens"] > 0 and teacher["completion_tokens"] > 0  # the tiny teacher's tokenizer counted them
    train_line = next(s for s in night["steps"] if s["step"] == "train")
    assert train_line["gpu_hours"] is None and train_line["gpu_absent"] == NO_DEVICE and train_line["cpu_s"] > 0

    monkeypatch.setattr(console, "width", 200)
    shown = CliRunner().invoke(app, ["cost", str(DEMO), f"artifact_root={cfg.artifact_root}"])
    assert shown.exit_code == 0, shown.output
    assert "not priced" in shown.output and "absent" in shown.output and str(teacher["requests"]) in shown.output
    priced = CliRunner().invoke(app, ["cost", str(DEMO), f"artifact_root={cfg.artifact_root}",
                                      "cost.teacher_usd_per_m_prompt=1"])  # prices apply when the night is recorded
    assert priced.exit_code == 0 and "not priced" in priced.output
    models = CliRunner().invoke(app, ["models", str(DEMO), f"artifact_root={cfg.artifact_root}"])
    assert models.exit_code == 0 and f"not priced ({teacher['requests']} requests)" in models.output
