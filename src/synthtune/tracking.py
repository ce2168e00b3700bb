"""Experiment tracking in MLflow (optional: `pip install 'synthtune[mlflow]'`).

With `tracking.mlflow_uri` set, each pipeline run is one MLflow run (one per Prefect flow run, the
split-mode GPU child joining its parent's), holding:
- the resolved config as params, the Prefect flow-run id and the command as tags;
- TRL's training metrics, logged live by the training child through `report_to` into this run;
- per step: the funnel counts, the train run's metrics (tokens/s, MFU, peak memory, losses), the
  base, tuned and champion scores, and the verdict;
- the loss curve and the eval chart as artifacts, the adapter as a logged model;
- a registered model version of the champion with the `@champion` alias (where the tracking store has
  a model registry), set at the end of every run (and by `synthtune rollback`) to whatever the
  pipeline's registry on the artifact root says is in service: it mirrors that registry, which stays
  the truth, so a cached verdict or a crashed promote never moves it elsewhere.

A step that comes back Cached is logged from its finished output, so every run is complete in MLflow
and a run whose server was down is logged again by running it again (every stage Cached).

The session listens to synthtune.progress (the same events the terminal shows), so both engines
(Prefect and local) track through the same code. Nothing here ever fails a run once it has started:
an MLflow call that fails is a warning in the run's log. An unreachable server is found before the
run starts (`check`), by preflight and when the session opens.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

log = logging.getLogger("synthtune.tracking")

RUN_TAG = "synthtune.run"  # the pipeline run (Prefect's root flow run id): parent and GPU child share it
KEY_TAG = "synthtune.train_key"


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI."""


@dataclass(frozen=True)
class ActiveRun:
    uri: str
    run_id: str
    experiment: str


# the MLflow run of the pipeline run in progress, for the training child's environment
ACTIVE: contextvars.ContextVar[ActiveRun | None] = contextvars.ContextVar("synthtune_tracking", default=None)


def check(cfg: PipelineConfig) -> list[str]:
    """Problems with the tracking settings, found without starting anything: the MLflow package, the
    server answering (http) or the store's folder (file, sqlite), and the `report_to` integrations."""
    tc = cfg.tracking
    problems = []
    for name in tc.report_to:
        module = {"wandb": "wandb", "trackio": "trackio", "tensorboard": "tensorboard", "comet_ml": "comet_ml",
                  "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}.get(name, name)
        if not _importable(module):
            problems.append(f"tracking.report_to: '{name}' is not installed here (pip install {module})")
    uri = tc.mlflow_uri
    if not uri:
        return problems
    if not _importable("mlflow"):
        return [*problems, f"tracking.mlflow_uri {uri}: the mlflow package is not installed "
                           "(pip install 'synthtune[mlflow]')"]
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    problems.append(f"tracking.mlflow_uri {uri}: /health answered {response.status}")
        except (urllib.error.URLError, OSError) as e:
            problems.append(f"tracking.mlflow_uri {uri}: unreachable ({getattr(e, 'reason', e)}); start the server or "
                            "fix the URI (empty turns tracking off)")
    elif scheme in ("sqlite", "file"):
        path = Path(urllib.parse.urlparse(uri).path if scheme == "file" else uri.removeprefix("sqlite:///"))
        folder = path if scheme == "file" else path.parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            problems.append(f"tracking.mlflow_uri {uri}: cannot write under {folder}")
    else:
        problems.append(f"tracking.mlflow_uri {uri}: expected http(s)://, sqlite:/// or file:")
    return problems


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def child_env() -> dict[str, str]:
    """Environment for the training child: TRL's MLflow callback logs into this pipeline run's MLflow
    run (and logs no params of its own: ours are the resolved config)."""
    run = ACTIVE.get()
    if run is None:
        return {}
    return {"MLFLOW_TRACKING_URI": run.uri, "MLFLOW_RUN_ID": run.run_id, "MLFLOW_EXPERIMENT_NAME": run.experiment,
            "MLFLOW_MAX_LOG_PARAMS": "0"}


def report_to(cfg: PipelineConfig) -> list[str]:
    """TRL's `report_to`: the configured integrations, plus mlflow when tracking is on."""
    tc = cfg.tracking
    return [*tc.report_to, *(["mlflow"] if tc.mlflow_uri and "mlflow" not in tc.report_to else [])] or ["none"]


def flat_params(cfg: PipelineConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted names, lists and mappings as JSON."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text[:6000]

    walk("", cfg.model_dump(mode="json"))
    return out


@dataclass
class Session:
    """One pipeline run's MLflow run; a synthtune.progress listener."""

    cfg: PipelineConfig
    client: Any
    run_id: str
    experiment_id: str
    url: str | None
    uris: dict[str, str] = dc_field(default_factory=dict)  # step -> its output's folder

    def __call__(self, event: dict) -> None:
        if event.get("kind") == "night_cost":
            with self._warn("logging the night's cost"):
                self._log_cost(event["ledger"])
            return
        if event.get("kind") != "step_end" or event.get("state") in ("Failed", "Skipped"):
            return
        step, summary = event["step"], event.get("summary") or {}
        with self._warn(f"logging {step}"):
            self._log_step(step, summary, event.get("uri"), event.get("state"))

    @contextlib.contextmanager
    def _warn(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # tracking never fails a run
            log.warning("MLflow (%s): %s failed: %s", self.cfg.tracking.mlflow_uri, what, e)

    def _metrics(self, values: dict[str, Any], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def _log_cost(self, ledger: dict) -> None:
        """The night's cost (synthtune.ledger): money where priced, counts always, GPU hours where measured."""
        from synthtune.ledger import summary_line

        values = {"cost.usd": ledger["usd"], "cost.saved_usd": ledger["saved_usd"], "cost.gpu_hours": ledger["gpu_hours"],
                  "cost.usd_per_point": ledger["usd_per_point"], "cost.retries": ledger["retries"],
                  "cost.cache_hits": ledger["cache_hits"],
                  **{f"cost.{role}.{f}": ledger[f][role] for f in ("requests", "prompt_tokens", "completion_tokens")
                     for role in ledger[f] if ledger[f][role] or role == "teacher"}}  # a cached night: 0
        self._metrics({k: v for k, v in values.items() if v is not None})
        self.client.set_tag(self.run_id, "synthtune.cost", summary_line(ledger)[:5000])

    def _log_step(self, step: str, summary: dict, uri: str | None, state: str | None) -> None:
        if uri:
            self.uris[step] = uri
        rows = summary.get("rows") or {}
        self._metrics({f"{step}.rows.{k}": v for k, v in rows.items()})
        if step == "template":
            self._metrics({f"template.{k}": summary.get(k) for k in ("trained_token_share", "p99_tokens")})
        elif step == "train":
            self._metrics({f"train.{k}": summary.get(k) for k in (
                "tokens_per_s", "mfu", "peak_gpu_memory_gib", "first_loss", "last_loss", "train_loss", "steps",
                "seconds", "step_time_s", "trainable_params", "lora_params")})
            self.client.set_tag(self.run_id, KEY_TAG, _key_of(uri))
            if uri:
                self._train_outputs(uri, cached=state == "Cached")
        elif step.startswith("evaluate"):
            role = step.partition("[")[2].rstrip("]") or "tuned"
            self._metrics({f"{role}.{task}.{metric}": v for task, ms in (summary.get("scores") or {}).items()
                           for metric, v in ms.items()})
        elif step == "promote":
            self._metrics({"promote.promoted": int(bool(summary.get("promoted"))), "promote.p_value": summary.get("p_value")})
            self.client.set_tag(self.run_id, "synthtune.verdict", "; ".join(summary.get("reasons", []))[:5000])
            if uri:
                with _local(uri) as folder:
                    for name in ("comparison.png", "verdict.json"):
                        if (folder / name).is_file():
                            self.client.log_artifact(self.run_id, str(folder / name), "promote")

    def _train_outputs(self, uri: str, cached: bool) -> None:
        with _local(uri) as folder:
            if (folder / "loss.png").is_file():
                self.client.log_artifact(self.run_id, str(folder / "loss.png"), "train")
            if cached and (folder / "loss_history.json").is_file():  # TRL logged it live when it trained now
                for entry in json.loads((folder / "loss_history.json").read_text()):
                    self._metrics({k: v for k, v in entry.items() if k != "step"}, int(entry.get("step", 0)))
            if (folder / "adapter").is_dir():
                self.log_adapter(_key_of(uri), folder / "adapter")

    def log_adapter(self, train_key: str, adapter: Path) -> str:
        """The adapter as an MLflow logged model (once per train key and experiment); its model id."""
        found = self.client.search_logged_models([self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{train_key}'",
                                                 max_results=1)
        if found:
            return found[0].model_id
        model = self.client.create_logged_model(
            self.experiment_id, name=f"{self.cfg.name}-adapter", source_run_id=self.run_id,
            tags={KEY_TAG: train_key, "synthtune.student": self.cfg.student}, model_type="peft-lora-adapter")
        self.client.log_model_artifacts(model.model_id, str(adapter))
        self.client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def mirror_registry(self) -> str | None:
        """`@champion` on the version of whatever the pipeline's registry says is in service (the adapter
        logged first when MLflow does not hold it yet); the train key it points at, or None."""
        from synthtune.registry import Registry
        from synthtune.store import ArtifactStore

        record = Registry(ArtifactStore(self.cfg.artifact_root), self.cfg.name).champion()
        if record is None:
            return None
        self.register_champion(record["train_key"])
        return record["train_key"]

    def register_champion(self, train_key: str) -> None:
        """A registered model version for the adapter, with the @champion alias."""
        from synthtune.store import ArtifactStore

        store = ArtifactStore(self.cfg.artifact_root)
        ref = store.ref("train", train_key)
        if ref is None:
            raise TrackingError(f"train output {train_key} is not on the artifact root")
        with store.local_copy(ref) as folder:
            model_id = self.log_adapter(train_key, Path(folder) / "adapter")
        mirror_champion(self.client, registered_name(self.cfg), train_key, model_id, self.run_id)


def registered_name(cfg: PipelineConfig) -> str:
    return cfg.tracking.registered_model or cfg.name


def mirror_champion(client, name: str, train_key: str, model_id: str | None = None, run_id: str | None = None) -> str:
    """Point `name@champion` at the version of `train_key` (created from `model_id` when missing); the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="synthtune adapters; @champion mirrors the artifact root's "
                                                          "registry/champion.json")
    versions = client.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{train_key}'")
    if versions:
        version = versions[0].version
    elif model_id is None:
        raise TrackingError(f"no version of registered model '{name}' holds train key {train_key}")
    else:
        logged = client.get_logged_model(model_id)
        version = client.create_model_version(name, source=logged.artifact_location, run_id=run_id,
                                              tags={KEY_TAG: train_key}, model_id=model_id).version
    client.set_registered_model_alias(name, "champion", version)
    return str(version)


def _key_of(uri: str | None) -> str:
    return (uri or "").rstrip("/").rsplit("/", 1)[-1]


@contextlib.contextmanager
def _local(uri: str) -> Iterator[Path]:
    """A local folder with the output at `uri` (copied down from an object store)."""
    from synthtune.store import ArtifactStore

    parent, _, key = uri.rstrip("/").rpartition("/")
    root, _, stage = parent.rpartition("/")
    store = ArtifactStore(root)
    ref = store.ref(stage, key)
    if ref is None:
        yield Path(uri)
        return
    with store.local_copy(ref) as folder:
        yield Path(folder)


def client_for(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that went away costs seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_run(cfg: PipelineConfig, pipeline_run: str, name: str, tags: dict[str, str] | None = None) -> Session:
    """The MLflow run of pipeline run `pipeline_run` (created, or found: a split-mode GPU child joins
    its parent's). Raises TrackingError when the server cannot be used."""
    problems = check(cfg)
    if problems:
        raise TrackingError("; ".join(problems))
    tc, uri = cfg.tracking, cfg.tracking.mlflow_uri
    try:
        client = client_for(uri)
        experiment = client.get_experiment_by_name(tc.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(tc.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{pipeline_run}'", max_results=1)
        if found:
            run = found[0]
        else:
            run = client.create_run(experiment_id, run_name=name, tags={
                RUN_TAG: pipeline_run, "synthtune.pipeline": cfg.name, "synthtune.command": " ".join(sys.argv)[:5000],
                **(tags or {})})
            params = flat_params(cfg)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run.info.run_id, params=items[i:i + 100])
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"tracking.mlflow_uri {uri}: {e}") from e
    url = None
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}"
    return Session(cfg, client, run.info.run_id, experiment_id, url)


@contextlib.contextmanager
def session(cfg: PipelineConfig, pipeline_run: str, name: str, tags: dict[str, str] | None = None,
            owner: bool = True) -> Iterator[Session | None]:
    """Track the steps run inside this block in MLflow (None, and nothing done, when tracking is off).
    The run ends FINISHED or FAILED with the block when `owner` (a split-mode child leaves that to
    its parent)."""
    from synthtune import progress

    if not cfg.tracking.mlflow_uri:
        yield None
        return
    tracker = open_run(cfg, pipeline_run, name, tags)
    token = ACTIVE.set(ActiveRun(cfg.tracking.mlflow_uri, tracker.run_id, cfg.tracking.experiment))
    status = "FAILED"
    try:
        with progress.listen(tracker):
            yield tracker
        status = "FINISHED"
    finally:
        ACTIVE.reset(token)
        if owner:
            with tracker._warn("mirroring the registry's champion"):
                tracker.mirror_registry()
            with tracker._warn("ending the run"):
                tracker.client.set_terminated(tracker.run_id, status)
