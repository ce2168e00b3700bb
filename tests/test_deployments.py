"""deployments/: prefect.yaml's deployments are valid pipelines, and the GPU job templates render
to what a Kubernetes, Docker or process worker needs (rendered with Prefect's own templating)."""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from synthtune.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
TEMPLATES = ROOT / "deployments" / "job-templates"


def render(template: dict, **values) -> dict:
    """The job configuration a worker builds: the template with each variable's default (or `values`)."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    return apply_values(template["job_configuration"], {**defaults, **values})


def test_deployments_are_valid_pipelines_with_the_expected_schedule_and_pools(tmp_path):
    deployments = {d["name"]: d for d in SPEC["deployments"]}
    assert set(deployments) == {"nightly", "adhoc", "adhoc-split", "gpu-stages"}
    nightly = deployments["nightly"]
    [schedule] = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "Europe/Berlin"
    assert nightly["concurrency_limit"]["limit"] == 1
    assert "schedules" not in deployments["adhoc"]
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"gpu", "cpu"}
    assert deployments["adhoc-split"]["work_pool"]["name"] == "cpu"
    assert deployments["adhoc-split"]["parameters"]["gpu_deployment"] == "synthtune-gpu/gpu-stages"

    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, func))
        if "config" in d.get("parameters", {}):  # the deploy-time template filled in, paths from the checkout
            raw = json.loads(json.dumps(d["parameters"]["config"]).replace("{{ $SYNTHTUNE_ARTIFACT_ROOT }}",
                                                                              str(tmp_path)))
            cfg = PipelineConfig.model_validate(raw, context={"base_dir": ROOT})
            assert Path(cfg.generate.seeds).is_dir()  # the nightly reads a seed folder


def test_the_deployed_pipeline_is_the_demo_config():
    """prefect.yaml carries the demo pipeline inline (prefect deploy cannot read our YAML): it must not
    drift from configs/demo.yaml. Only the name and the artifact root (filled in at deploy time) differ."""
    from synthtune.config import load_config

    raw = dict(SPEC["definitions"]["parameters"]["pipeline"], artifact_root="/shared/artifacts")
    deployed = PipelineConfig.model_validate(raw, context={"base_dir": ROOT}).model_dump(mode="json")
    demo = load_config(ROOT / "configs" / "demo.yaml").model_dump(mode="json")
    for cfg in (deployed, demo):
        cfg.pop("name"), cfg.pop("artifact_root")
    assert deployed == demo


def test_synthtune_deploy_makes_config_paths_relative_to_the_checkout(tmp_path):
    from flows.deploy import DeployError, plan
    from synthtune.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"artifact_root={tmp_path}"])
    [nightly] = plan(cfg, "nightly", "0 2 * * *", "Europe/Berlin", "gpu", False, "cpu")
    config = nightly.parameters["config"]
    assert config["generate"]["seeds"] == "configs/data/seeds" and config["evaluate"]["task_dir"] == "configs/eval_tasks"
    assert PipelineConfig.model_validate(config, context={"base_dir": ROOT}) == cfg  # what a worker in its checkout reads
    parent, child = plan(cfg, "nightly", None, "UTC", "gpu", True, "cpu")
    assert (parent.pool, parent.parameters["gpu_deployment"], child.name, child.pool) == (
        "cpu", "synthtune-gpu/nightly-gpu", "nightly-gpu", "gpu")
    for bad, match in (({"cron": "0 25 * * *"}, "--cron '0 25 \\* \\* \\*': not a cron expression"),
                       ({"timezone": "Mars/Olympus"}, "--timezone 'Mars/Olympus': not an IANA timezone"),
                       ({"name": "a/b"}, "--name 'a/b'")):
        args = {"name": "nightly", "cron": "0 2 * * *", "timezone": "UTC", **bad}
        with pytest.raises(DeployError, match=match):
            plan(cfg, args["name"], args["cron"], args["timezone"], "gpu", False, "cpu")
    with pytest.raises(DeployError, match=r"artifact_root '.*/\.synthtune/artifacts' is this checkout's own folder"):
        plan(load_config(ROOT / "configs" / "demo.yaml"), "n", None, "UTC", "gpu", False, "cpu")


def test_an_unfilled_artifact_root_names_the_variable():
    raw = dict(SPEC["definitions"]["parameters"]["pipeline"])
    with pytest.raises(ValueError, match="SYNTHTUNE_ARTIFACT_ROOT"):
        PipelineConfig.model_validate(raw, context={"base_dir": ROOT})


@pytest.mark.parametrize("name", ["kubernetes-gpu", "docker-gpu", "process-gpu"])
def test_every_placeholder_has_a_variable(name):
    template = json.loads((TEMPLATES / f"{name}.json").read_text())
    used = set(re.findall(r"{{\s*([\w]+)\s*}}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"])


def test_kubernetes_pods_ask_for_a_gpu_on_gpu_nodes():
    job = render(json.loads((TEMPLATES / "kubernetes-gpu.json").read_text()))
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    two = render(json.loads((TEMPLATES / "kubernetes-gpu.json").read_text()), gpu_count=2)
    assert two["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_docker_containers_get_the_gpus():
    job = render(json.loads((TEMPLATES / "docker-gpu.json").read_text()))
    [request] = job["container_create_kwargs"]["device_requests"]
    assert request == {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}


def test_process_template_keeps_the_worker_settings():
    job = render(json.loads((TEMPLATES / "process-gpu.json").read_text()))
    assert job["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_the_nightly_trigger_matches_its_own_pipeline():
    """Finding 14: the trigger in prefect.yaml matched only a pipeline named `nightly`; it must be the
    pipeline its deployment runs (and the deployment is named after it)."""
    nightly = next(d for d in SPEC["deployments"] if d["name"] == "nightly")
    pipeline = nightly["parameters"]["config"]["name"]
    [trigger] = nightly["triggers"]
    assert trigger["match"]["prefect.resource.id"] == f"synthtune.pipeline.{pipeline}" and nightly["name"] == pipeline
    assert trigger["expect"] == ["synthtune.seeds.arrived"]


def test_seeds_arrived_fails_when_no_server_takes_the_event(tmp_path):
    import subprocess
    import sys

    from synthtune.server import free_port

    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    done = subprocess.run([str(Path(sys.executable).parent / "synthtune"), "seeds-arrived", str(ROOT / "configs" /
                                                                                                "demo.yaml")],
                          env={**os.environ, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "did not take synthtune.seeds.arrived" in done.stderr, done
    assert "emitted" not in done.stdout + done.stderr


def test_the_rayjob_runs_a_valid_night_its_workers_can_hold():
    """The RayJob example's entrypoint is a valid pipeline on Ray (generate and train), its training
    workers fit the worker group's GPUs, and every pod mounts the artifact root at the same path."""
    import shlex

    from synthtune.config import load_config
    from synthtune.stages.train import per_rank

    job = yaml.safe_load((ROOT / "deployments" / "job-templates" / "rayjob.yaml").read_text())
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["synthtune", "run", "configs/my.yaml"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", command[3:])
    tc = cfg.train
    assert (cfg.generate.engine, tc.engine, tc.ray_address) == ("ray", "ray", "auto")
    per_rank(tc.batch_size, tc.gradient_accumulation_steps, tc.num_workers, "train.num_workers")  # divides
    cluster = job["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    gpus = group["replicas"] * group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert tc.num_workers * tc.ray_gpus_per_worker <= gpus
    pods = [cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert claims == {"artifacts": "synthtune-artifacts"} and mounts["artifacts"] == cfg.artifact_root
