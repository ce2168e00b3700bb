"""preflight: cheap checks before any data or GPU time is spent.

The config is already validated by pydantic (fields, ranges, files). Here: the student and teacher
load without remote code, the student tokenizer has a chat template and a pad or eos token, the
eval tasks exist, and the artifact root has the free disk the config asks for.

Run as: synthtune preflight configs/demo.yaml
"""

from __future__ import annotations

import importlib.util
import json
import logging
from typing import TYPE_CHECKING

from synthtune import ledger, tracking
from synthtune.configs import PreflightConfig
from synthtune.eval_tasks import backend_problems, chat_payload, check_tasks, local_tasks, task_data, task_requests
from synthtune.keys import key_payload, stage_key
from synthtune.models import fingerprint, identity, resolve, revision_kw
from synthtune.store import ArtifactRef, ArtifactStore, Staging, produce
from synthtune.teacher import endpoint_problems

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

__all__ = ["PreflightConfig", "PreflightError", "key", "run"]

STAGE = "preflight"
log = logging.getLogger("synthtune.preflight")
VERSION = "1"
GiB = 1 << 30


class PreflightError(RuntimeError):
    """One or more checks failed; the message lists each with what to do."""


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """What preflight checks, and nothing else (a change to, say, train.lora.r must not rerun it): its
    settings, the models, the eval tasks and the root whose disk it measures."""
    gen = cfg.generate
    payload = {
        "preflight": key_payload(cfg.preflight),
        "evaluate_tasks": {"tasks": cfg.evaluate.tasks, **key_payload(cfg.evaluate)},
        "models": [fingerprint(cfg.student, cfg.student_revision),
                   identity(gen.teacher, gen.teacher_kind, gen.base_url, gen.teacher_revision),
                   *(identity(m, gen.teacher_kind, gen.base_url, gen.judge_revision) for m in (gen.judge,) if m),
                   *(fingerprint(m) for m in (cfg.generate.rejected_model,) if m and cfg.generate.mode == "preference")],
        "artifact_root": cfg.artifact_root,
        # format parity: the template and its variables, the eval flags and the local tasks' items
        "format": {"chat": chat_payload(cfg), "system_prompt": cfg.template.system_prompt,
                   "data_files": task_data(cfg.evaluate), "allow": cfg.evaluate.allow_format_difference},
    }
    if cfg.train.init == "champion":  # the champion it continues must match the LoRA shape: checked again when either moves
        from synthtune.registry import Registry

        payload["continues"] = {"champion": (Registry(ArtifactStore(cfg.artifact_root), cfg.name).champion() or {}).get(
            "train_key"), "lora": key_payload(cfg.train)["lora"], "student": cfg.student}
    return stage_key(STAGE, VERSION, payload, upstream)


def check_model(spec: str, role: str, allow_remote_code: bool, revision: str | None = None) -> list[str]:
    """Problems with a model's config (architecture known locally, no remote code needed)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve(spec), trust_remote_code=False, **revision_kw(revision))
    except ValueError as e:
        if "trust_remote_code" in str(e) and allow_remote_code:
            return []
        return [f"{role} '{spec}' needs remote code or is unknown to transformers: {e}. "
                "Pick a natively supported model, or set preflight.allow_remote_code=true."]
    except OSError as e:
        return [f"{role} '{spec}' cannot be loaded: {e}"]
    if getattr(config, "auto_map", None) and not allow_remote_code:
        return [f"{role} '{spec}' ships custom code (auto_map); set preflight.allow_remote_code=true to allow it"]
    return []


def check_tokenizer(spec: str, revision: str | None = None) -> list[str]:
    from synthtune.models import load_tokenizer

    tok = load_tokenizer(spec, revision)
    problems = []
    if not tok.chat_template:
        problems.append(f"student '{spec}' tokenizer has no chat template: use an instruct/chat variant "
                        "or add `chat_template` to its tokenizer_config.json")
    if tok.pad_token is None and tok.eos_token is None:
        problems.append(f"student '{spec}' tokenizer has neither a pad nor an eos token")
    return problems


def check_disk(store: ArtifactStore, min_free_gb: float) -> tuple[list[str], float | None]:
    free = store.free_bytes()
    if free is None:
        return [], None
    if free < min_free_gb * GiB:
        return [f"only {free / GiB:.2f} GiB free at {store.root_url}; preflight.min_free_gb asks for "
                f"{min_free_gb:.2f} GiB. Free space or point artifact_root elsewhere."], free / GiB
    return [], free / GiB


def task_problems(cfg: PipelineConfig) -> list[str]:
    """The eval tasks, their data and the metric the gate compares, checked without a model."""
    scored = [cfg.promote.target_task, *cfg.promote.guard_tasks]
    return check_tasks(cfg.evaluate.tasks, cfg.evaluate.task_dir, cfg.promote.metric, scored)


def registry_problems(cfg: PipelineConfig, store: ArtifactStore) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the pipeline's registry on the root, read without changing it."""
    from synthtune.registry import Registry

    return Registry(store, cfg.name, migrate=False).problems()


def lineage_problems(cfg: PipelineConfig, store: ArtifactStore) -> list[str]:
    """train.init: champion: the champion is intact, and its LoRA shape and base model are this config's."""
    if cfg.train.init != "champion":
        return []
    from synthtune import lineage

    try:
        start = lineage.start(cfg, store)
        if start.parent is not None:
            lineage.check_shape(cfg, store, start.parent.key)
    except ValueError as e:  # RegistryError included
        return [str(e)]
    return []


def format_parity(cfg: PipelineConfig) -> tuple[list[str], dict]:
    """(errors, report): lm-eval renders the local eval tasks' first items as training renders the same
    conversation (synthtune.parity), or evaluate.allow_format_difference acknowledges that it does not."""
    from synthtune import parity
    from synthtune.models import load_tokenizer

    tok = load_tokenizer(cfg.student, cfg.student_revision)
    enc = parity.encoder(cfg, tok)
    found = parity.check(cfg, enc, parity.eval_template(enc), cfg.evaluate.task_dir)
    report = {"differences": [str(f) for f in found], "acknowledged": bool(found) and cfg.evaluate.allow_format_difference,
              # registry tasks are not on disk here: lm-eval renders them at evaluation time, unchecked
              "unchecked": [t for t in cfg.evaluate.tasks if t not in local_tasks(cfg.evaluate.task_dir)]}
    if not found or cfg.evaluate.allow_format_difference:
        for f in found:
            log.warning("format difference acknowledged (evaluate.allow_format_difference): %s", f)
        return [], report
    return [f"format parity: eval task {f} — lm-eval would score a format training never saw. Make the task's "
            "prompt and target_delimiter match the template (template.chat_template_kwargs, "
            "evaluate.system_instruction = template.system_prompt), or set evaluate.allow_format_difference: true"
            for f in found], report


def evaluation_estimate(cfg: PipelineConfig, store: ArtifactStore, nights: int = 10) -> dict:
    """How long tonight's evaluation will take against training, before either runs: the requests lm-eval
    will score per model (counted from the tasks' data), timed by the pipeline's newest evaluation built
    on this root (its seconds per request) and set against its newest training's seconds. `dominates`
    when scoring tonight's candidate alone would take longer than that training; none of it without an
    earlier night to time by."""
    requests, unknown = task_requests(cfg.evaluate)
    out = {"requests_per_model": requests, "uncounted_tasks": unknown, "seconds_per_request": None,
           "evaluate_s": None, "train_s": None, "dominates": False}
    per_request = train_s = None
    for night in reversed(ledger.history(store, cfg.name, nights)):
        for step in night["steps"]:
            if step["cached"] or not step.get("wall_s"):
                continue
            if step["stage"] == "train" and train_s is None:
                train_s = step["wall_s"]
            elif step["stage"] == "evaluate" and per_request is None:
                metrics = (store.manifest("evaluate", step["key"]) or {}).get("metrics", {})
                scored = sum(r.get("requests", 0) for r in metrics.get("ranks", []))
                per_request = step["wall_s"] / scored if scored else None
    if per_request is None or train_s is None:
        return out
    evaluate_s = per_request * requests
    return {**out, "seconds_per_request": round(per_request, 6), "evaluate_s": round(evaluate_s, 1),
            "train_s": round(train_s, 1), "dominates": evaluate_s > train_s}


def estimate_warning(estimate: dict) -> str | None:
    """The preflight warning when evaluation will dominate the night."""
    if not estimate["dominates"]:
        return None
    return (f"evaluation will dominate the night: about {estimate['evaluate_s']:.0f} s per model to score "
            f"{estimate['requests_per_model']} requests (at {estimate['seconds_per_request'] * 1000:.1f} ms each, as "
            f"measured on this root) against {estimate['train_s']:.0f} s for the last training; base and champion "
            "add as much on nights their scores are not cached. Cut evaluate.limit or the tasks, or raise "
            "evaluate.num_processes")


def checks(cfg: PipelineConfig, store: ArtifactStore) -> tuple[list[str], dict]:
    problems = check_model(cfg.student, "student", cfg.preflight.allow_remote_code, cfg.student_revision)
    gen = cfg.generate
    problems += endpoint_problems(gen)  # an HTTP teacher or judge: up, the key accepted, the model served
    if gen.teacher_kind == "transformers":  # local models must load
        problems += check_model(gen.teacher, "teacher", cfg.preflight.allow_remote_code, gen.teacher_revision)
        if gen.judge:
            problems += check_model(gen.judge, "judge", cfg.preflight.allow_remote_code, gen.judge_revision)
    if gen.mode == "preference" and gen.rejected_model:
        problems += check_model(gen.rejected_model, "rejected_model", cfg.preflight.allow_remote_code)
    if not problems:
        problems += check_tokenizer(cfg.student, cfg.student_revision)
    problems += task_problems(cfg) + backend_problems(cfg.evaluate)
    parity = {}
    if not problems:
        errors, parity = format_parity(cfg)
        problems += errors
    problems += registry_problems(cfg, store)[0]
    problems += lineage_problems(cfg, store)
    problems += tracking.check(cfg)
    for section, engine in (("generate", gen.engine), ("train", cfg.train.engine)):
        if engine == "ray" and importlib.util.find_spec("ray") is None:
            problems.append(f"{section}.engine=ray: ray is not installed here (pip install 'synthtune[ray]')")
    disk, free_gb = check_disk(store, cfg.preflight.min_free_gb)
    warnings = []
    if gen.teacher == "tiny:teacher" and gen.seeds and gen.mode != "magpie":
        from synthtune.seeds import read_seeds
        from synthtune.tiny import teacher_warning

        try:
            prompts = [r["instruction"] for r in read_seeds(gen.seeds, gen.prompt_field).rows]
        except Exception:  # unreadable seeds are generate's to report
            prompts = []
        if warning := teacher_warning(gen.teacher, prompts):
            log.warning(warning)
            warnings.append(warning)
    estimate = evaluation_estimate(cfg, store)
    if warning := estimate_warning(estimate):
        log.warning(warning)
        warnings.append(warning)
    return problems + disk, {"free_gb": free_gb, "format_parity": parity, "warnings": warnings,
                             "evaluation": estimate}


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None,
        output_key: str | None = None, rebuild: bool = False) -> ArtifactRef:
    """Run every check (or reuse a passed preflight of the same key); raises PreflightError listing
    every problem with what to do."""
    k = output_key or key(cfg, {})

    def build(staging: Staging) -> None:
        problems, facts = checks(cfg, store)
        if problems:
            raise PreflightError("preflight failed:\n" + "\n".join(f"  - {p}" for p in problems))
        (staging.path / "report.json").write_text(json.dumps({"ok": True, **facts}, indent=2))
        staging.metrics.update(facts)

    return produce(store, STAGE, k, {}, key_payload(cfg.preflight), build, rebuild)
