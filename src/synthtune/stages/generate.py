"""generate: synthetic answers from a teacher model through a distilabel pipeline.

Seeds come from a JSONL or parquet file or a datasets folder (`id` plus the prompt field). The
teacher is a local transformers model (distilabel's `TransformersLLM`) or an OpenAI-compatible
endpoint (`OpenAILLM`, retried with backoff, the key read from an environment variable). In
preference mode a second, weaker model answers the same seeds and its answers become `rejected`.
distilabel's own cache is never used: it ignores changed input data and step code, so every run
gets a fresh cache folder and `use_cache=False`; our cache key (seed contents, teacher identity,
prompts, generation kwargs) decides instead. distilabel runs in a spawned child process (it forks
workers, takes over the root logger and installs a SIGINT handler); its `distilabel.*` records are
forwarded to the caller.

Run as: synthtune generate configs/demo.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import InputPath, Section, field
from synthtune.io import read_jsonl
from synthtune.models import fingerprint, resolve

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "generate"
VERSION = "2"
UPSTREAM: tuple[str, ...] = ()


class GenerateConfig(Section):
    teacher: str = field(
        ..., "Teacher model: a Hugging Face id, a local folder or `tiny:teacher` (kind transformers), or the model "
        "name an OpenAI-compatible server knows (kind openai)."
    )
    mode: Literal["sft", "preference"] = field(
        "sft", "`sft`: prompt -> teacher response. `preference`: the teacher's answer is `chosen`, the answer of "
        "`rejected_model` (a weaker model, typically the student) is `rejected`, for DPO.")
    rejected_model: str | None = field(
        None, "Preference mode: the local model whose answers become `rejected` (e.g. tiny:student or the student id).")
    teacher_kind: Literal["transformers", "openai"] = field(
        "transformers", "`transformers`: the teacher runs in-process. `openai`: any OpenAI-compatible `base_url` "
        "(vLLM, TGI, `transformers serve`, a hosted API).")
    base_url: str | None = field(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (kind openai).")
    api_key_env: str = field(
        "OPENAI_API_KEY", "Name of the environment variable holding the API key (the key itself is never in the "
        "config, logs, artifacts or manifests). Unset: no key is sent.")
    timeout_s: float = field(120, "Seconds before an HTTP request to the teacher times out (then retried).", gt=0,
                             affects_output=False)
    max_retries: int = field(6, "Retries with exponential backoff on HTTP 429/5xx and timeouts.", ge=0,
                             affects_output=False)
    seeds: InputPath = field(
        ..., "Seed rows: a JSONL or parquet file, or a `datasets` folder (save_to_disk); each row needs an `id` and "
        "the prompt field.")
    prompt_field: str = field("prompt", "Name of the field in each seed row that holds the instruction.")
    system_prompt: str | None = field(None, "System prompt sent to the teacher with every seed.")
    max_new_tokens: int = field(128, "Most tokens the teacher may write per answer.", ge=1, le=32768)
    temperature: float = field(0.0, "Sampling temperature; 0 means greedy decoding.", ge=0, le=5)
    num_generations: int = field(1, "Answers generated per seed.", ge=1, le=64)
    batch_size: int = field(8, "Seeds sent to the teacher per batch.", ge=1, le=4096)
    seed: int = field(0, "Random seed for sampling.")

    @model_validator(mode="after")
    def _preference_needs_a_rejected_model(self) -> GenerateConfig:
        if self.mode == "preference" and not self.rejected_model:
            raise ValueError("mode=preference needs rejected_model (the model whose answers are `rejected`)")
        return self


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    gen = cfg.generate
    extra = {"rejected_model": fingerprint(gen.rejected_model)} if gen.mode == "preference" and gen.rejected_model else {}
    teacher = fingerprint(gen.teacher) if gen.teacher_kind == "transformers" else f"openai:{gen.base_url}:{gen.teacher}"
    payload = {"generate": key_payload(gen), "teacher": teacher, **extra}
    return stage_key(STAGE, VERSION, payload, upstream)


class GenerationError(RuntimeError):
    pass


def read_seed_rows(path) -> tuple[list[dict], list[dict]]:
    """Rows (each with `_line`, its 1-based position) of a JSONL or parquet file or a datasets folder."""
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        return [{**row, "_line": i} for i, row in enumerate(data.to_list(), 1)], []
    if path.suffix == ".parquet":
        import pandas as pd

        return [{**row, "_line": i} for i, row in enumerate(pd.read_parquet(path).to_dict("records"), 1)], []
    return read_jsonl(path)


def load_seeds(gen: GenerateConfig) -> tuple[list[dict], list[dict]]:
    """Valid seed rows, and quarantined ones with the reason (file, line, field)."""
    rows, bad = read_seed_rows(gen.seeds)
    good = []
    for row in rows:
        prompt = row.get(gen.prompt_field)
        where = {"file": str(gen.seeds), "line": row["_line"]}
        if "id" not in row:
            bad.append({**where, "reason": "missing field 'id'"})
        elif not isinstance(prompt, str) or not prompt.strip():
            bad.append({**where, "id": str(row["id"]), "reason": f"field '{gen.prompt_field}' missing or not text"})
        else:
            good.append({"id": str(row["id"]), "instruction": prompt})
    return good, bad


@contextlib.contextmanager
def distilabel_guard():
    """distilabel replaces the root logger's handlers during `run()` and installs a SIGINT handler,
    which raises off the main thread (Prefect runs tasks in worker threads). Restore logging after,
    and skip the handler where it cannot be installed."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    original_signal = signal.signal
    if threading.current_thread() is not threading.main_thread():
        signal.signal = lambda sig, handler: signal.getsignal(sig)  # type: ignore[assignment]
    try:
        yield
    finally:
        signal.signal = original_signal
        root.handlers[:] = handlers
        root.setLevel(level)


def generation_kwargs(gen: GenerateConfig) -> dict:
    if gen.teacher_kind == "openai":
        return {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": 1.0}
    greedy = gen.temperature == 0
    return {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": not greedy,
        "temperature": 1.0 if greedy else gen.temperature,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    }


def check_endpoint(gen: GenerateConfig) -> None:
    """Before any generation: the OpenAI-compatible teacher answers `GET /models`, retried with
    backoff like generation requests; one that stays down fails naming the endpoint and last error."""
    import time
    import urllib.error
    import urllib.request

    if not gen.base_url:
        raise GenerationError("generate.teacher_kind=openai needs generate.base_url")
    key = os.environ.get(gen.api_key_env)
    request = urllib.request.Request(gen.base_url.rstrip("/") + "/models",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    last = None
    for attempt in range(gen.max_retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=gen.timeout_s) as response:
                if response.status < 400:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code not in (408, 409, 429) and e.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        time.sleep(min(0.5 * 2 ** attempt, 20))
    raise GenerationError(f"teacher endpoint {gen.base_url} is not answering after {gen.max_retries + 1} tries; "
                          f"last error: {last}")


def _generate(cfg: PipelineConfig, staging: Staging, k: str, on_log=None) -> None:
    seeds, quarantined = load_seeds(cfg.generate)
    if not seeds:
        raise GenerationError(f"{cfg.generate.seeds}: no usable seed rows; quarantined: {quarantined[:5]}")
    if cfg.generate.teacher_kind == "openai":
        check_endpoint(cfg.generate)
    # distilabel forks its workers: run it from a clean spawned process (see synthtune.child)
    from synthtune.child import call_in_child

    rows = call_in_child(_run_distilabel, cfg.generate, seeds, k, str(staging.path / ".distilabel"), on_log=on_log,
                         log_name="distilabel")
    _write(cfg.generate, staging, rows, seeds, quarantined)


def _run_distilabel(gen: GenerateConfig, seeds: list[dict], k: str, cache_dir: str) -> list[dict]:
    """Seeds through distilabel's TextGeneration; returns its rows (runs in a child process). In
    preference mode a second pass with `rejected_model` adds each row's `rejected` answer."""
    rows = _text_generation(gen, seeds, k, cache_dir)
    if gen.mode == "preference":
        weaker = gen.model_copy(update={"teacher": gen.rejected_model, "teacher_kind": "transformers"})
        others = {(r["id"], i): r.get("generation") for i, r in _indexed(_text_generation(weaker, seeds, k + "-rejected",
                                                                                          cache_dir))}
        rows = [{**r, "rejected": others.get((r["id"], i))} for i, r in _indexed(rows)]
    return rows


def _indexed(rows: list[dict]):
    """(generation index within its seed, row) pairs."""
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["id"]] = seen.get(r["id"], -1) + 1
        yield seen[r["id"]], r


def _text_generation(gen: GenerateConfig, seeds: list[dict], k: str, cache_dir: str) -> list[dict]:
    import torch
    from distilabel.models.llms import TransformersLLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    torch.manual_seed(gen.seed)
    if gen.teacher_kind == "openai":
        from distilabel.models.llms import OpenAILLM

        key = os.environ.get(gen.api_key_env)
        llm = OpenAILLM(model=gen.teacher, base_url=gen.base_url, api_key=key or "not-needed",
                        max_retries=gen.max_retries, timeout=int(gen.timeout_s), generation_kwargs=generation_kwargs(gen))
    else:
        llm = TransformersLLM(
            model=resolve(gen.teacher),
            device="cuda" if torch.cuda.is_available() else None,
            torch_dtype="auto",
            generation_kwargs=generation_kwargs(gen),
        )
    with Pipeline(name=f"synthtune-generate-{k}", cache_dir=cache_dir) as pipeline:
        load = LoadDataFromDicts(data=seeds, batch_size=gen.batch_size)
        task = TextGeneration(
            llm=llm,
            system_prompt=gen.system_prompt,
            num_generations=gen.num_generations,
            input_batch_size=gen.batch_size,
            add_raw_output=False,
            add_raw_input=False,
        )
        load >> task
    with distilabel_guard():
        distiset = pipeline.run(use_cache=False)
    return distiset["default"]["train"].to_list()


def _write(gen: GenerateConfig, staging: Staging, rows: list[dict], seeds: list[dict], quarantined: list[dict]) -> None:
    import pandas as pd

    # a step that raised makes distilabel emit rows of None instead of failing: fail here instead
    failed = [r for r in rows if r.get("generation") is None and r.get("model_name") is None]
    if rows and len(failed) == len(rows):
        where = f" at {gen.base_url}" if gen.teacher_kind == "openai" else ""
        raise GenerationError(f"teacher {gen.teacher}{where} produced no output for any of {len(rows)} seeds; "
                              "see the distilabel log above for the step's error")
    out, empty = [], 0
    per_seed: dict[str, int] = {}
    for r in rows:
        text = r.get("generation")
        if not isinstance(text, str) or not text.strip():
            empty += 1
            quarantined.append({"id": r["id"], "reason": "teacher returned no text"})
            continue
        idx = per_seed.get(r["id"], 0)
        per_seed[r["id"]] = idx + 1
        row = {"id": r["id"], "prompt": r["instruction"], "teacher": gen.teacher, "generation_index": idx}
        if gen.mode == "preference":
            rejected = r.get("rejected")
            if not isinstance(rejected, str) or not rejected.strip():
                empty += 1
                quarantined.append({"id": r["id"], "reason": f"{gen.rejected_model} returned no text"})
                continue
            row.update(chosen=text.strip(), rejected=rejected.strip(), rejected_model=gen.rejected_model)
        else:
            row["response"] = text.strip()
        out.append(row)
    shutil.rmtree(staging.path / ".distilabel", ignore_errors=True)
    if not out:
        raise GenerationError(f"teacher {gen.teacher} returned no usable text for any of {len(seeds)} seeds")
    pd.DataFrame(out).to_parquet(staging.path / "data.parquet", index=False)
    pd.DataFrame(quarantined, columns=["id", "file", "line", "reason"]).astype(str).to_parquet(
        staging.path / "quarantine.parquet", index=False)
    staging.rows.update(seeds=len(seeds), generated=len(out), quarantined=len(quarantined), empty=empty)


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None,
        on_log=None) -> ArtifactRef:
    """Generate (or reuse) the synthetic rows. `on_log(record)` receives distilabel's log records
    (only `distilabel.*`: forwarding everything would loop through whoever listens)."""
    k = key(cfg, {})
    return produce(store, STAGE, k, {}, key_payload(cfg.generate), lambda st: _generate(cfg, st, k, on_log))
