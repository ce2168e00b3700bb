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

from pydantic import SecretStr, model_validator

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import InputPath, Section, field
from synthtune.io import read_jsonl
from synthtune.models import fingerprint, resolve

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "generate"
VERSION = "3"
UPSTREAM: tuple[str, ...] = ()


class GenerateConfig(Section):
    teacher: str = field(
        ..., "Teacher model: a Hugging Face id, a local folder or `tiny:teacher` (kind transformers), or the model "
        "name an OpenAI-compatible server knows (kind openai)."
    )
    mode: Literal["sft", "preference", "magpie"] = field(
        "sft", "`sft`: seed prompt -> teacher response. `preference`: several answers per prompt (the teacher's "
        "`num_generations`, plus `rejected_model`'s); with a `judge` the best rated is `chosen` and the worst "
        "`rejected`, without one the teacher's answer is `chosen` and `rejected_model`'s `rejected`. `magpie`: "
        "no seeds; a local instruct teacher writes the instructions too (Magpie), `magpie_rows` of them.")
    rejected_model: str | None = field(
        None, "Preference mode: a local model whose answers join the candidates (e.g. tiny:student or the student id); "
        "needed without a judge, where its answer is `rejected`.")
    judge: str | None = field(
        None, "Model that rates answers with distilabel's UltraFeedback (1-5 with a rationale, columns `rating` and "
        "`rationale`); same kind and endpoint as the teacher. Empty: no judge.")
    judge_max_new_tokens: int = field(512, "Most tokens the judge may write (its ratings and rationales).", ge=16,
                                      le=32768)
    judge_aspect: Literal["overall-rating", "helpfulness", "honesty", "instruction-following", "truthfulness"] = field(
        "overall-rating", "UltraFeedback aspect the judge rates.")
    magpie_rows: int = field(64, "Magpie mode: how many instruction/response rows to draw.", ge=1, le=1_000_000)
    magpie_pre_query_template: str | None = field(
        None, "Magpie mode: the text that opens a user turn in the teacher's chat template (`llama3`, `qwen2` or the "
        "literal text). Empty: read from the teacher's chat template.")
    teacher_kind: Literal["transformers", "openai"] = field(
        "transformers", "`transformers`: the teacher runs in-process. `openai`: any OpenAI-compatible `base_url` "
        "(vLLM, TGI, `transformers serve`, a hosted API).")
    base_url: str | None = field(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (kind openai).")
    api_key_env: str = field(
        "OPENAI_API_KEY", "Name of the environment variable holding the API key (the key itself is never in the "
        "config, logs, artifacts or manifests). Unset: no key is sent.", affects_output=False)
    api_key_secret: str | None = field(
        None, "Name of a Prefect Secret block holding the API key, read by the Prefect task at run time (wins over "
        "api_key_env). Needs the Prefect engine.", affects_output=False)
    timeout_s: float = field(120, "Seconds before an HTTP request to the teacher times out (then retried).", gt=0,
                             affects_output=False)
    max_retries: int = field(6, "Retries with exponential backoff on HTTP 429/5xx and timeouts.", ge=0,
                             affects_output=False)
    seeds: InputPath | None = field(
        None, "Seed rows: a JSONL or parquet file, or a `datasets` folder (save_to_disk); each row needs an `id` and "
        "the prompt field. Needed except in magpie mode.")
    prompt_field: str = field("prompt", "Name of the field in each seed row that holds the instruction.")
    system_prompt: str | None = field(None, "System prompt sent to the teacher with every seed.")
    max_new_tokens: int = field(128, "Most tokens the teacher may write per answer.", ge=1, le=32768)
    temperature: float = field(0.0, "Sampling temperature; 0 means greedy decoding.", ge=0, le=5)
    num_generations: int = field(1, "Answers generated per seed.", ge=1, le=64)
    batch_size: int = field(8, "Seeds sent to the teacher per batch (an HTTP teacher gets a batch's requests "
                            "at once).", ge=1, le=4096)
    concurrency: int = field(1, "Batches in flight at once (distilabel replicas of the step): more load on an HTTP "
                             "teacher; a local teacher loads one copy of the model per replica.", ge=1, le=64,
                             affects_output=False)
    seed: int = field(0, "Random seed for sampling.")

    @model_validator(mode="after")
    def _mode_needs(self) -> GenerateConfig:
        if self.mode != "magpie" and self.seeds is None:
            raise ValueError(f"mode={self.mode} needs seeds (a JSONL, parquet or datasets folder of prompts)")
        if self.mode == "preference" and not self.judge and not self.rejected_model:
            raise ValueError("mode=preference needs a judge, or a rejected_model whose answers are `rejected`")
        if self.mode == "preference" and self.judge and self.num_generations + bool(self.rejected_model) < 2:
            raise ValueError("mode=preference with a judge needs two answers per prompt: num_generations >= 2 "
                             "or a rejected_model")
        if self.mode == "magpie" and self.teacher_kind != "transformers":
            raise ValueError("mode=magpie needs teacher_kind=transformers (it prompts the raw chat template)")
        return self


def identity(gen: GenerateConfig, model: str) -> str:
    """What a model is, for the cache key: a local model's contents, or the endpoint and model name."""
    return fingerprint(model) if gen.teacher_kind == "transformers" else f"openai:{gen.base_url}:{model}"


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    gen = cfg.generate
    extra = {"rejected_model": fingerprint(gen.rejected_model)} if gen.mode == "preference" and gen.rejected_model else {}
    if gen.judge:
        extra["judge"] = identity(gen, gen.judge)
    payload = {"generate": key_payload(gen), "teacher": identity(gen, gen.teacher), **extra}
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


def env_api_key(gen: GenerateConfig) -> SecretStr | None:
    value = os.environ.get(gen.api_key_env)
    return SecretStr(value) if value else None


def check_endpoint(gen: GenerateConfig, api_key: SecretStr | None) -> None:
    """Before any generation: the OpenAI-compatible teacher answers `GET /models`, retried with
    backoff like generation requests; one that stays down fails naming the endpoint and last error."""
    import time
    import urllib.error
    import urllib.request

    if not gen.base_url:
        raise GenerationError("generate.teacher_kind=openai needs generate.base_url")
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
    request = urllib.request.Request(gen.base_url.rstrip("/") + "/models", headers=headers)
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


def work_url(store: ArtifactStore, k: str) -> str:
    """Finished batches of an unfinished run `k`, beside the artifacts (any fsspec root), so a retry
    on any machine skips them. Removed once the stage commits."""
    return store.uri(STAGE, ".work", k)


def _generate(cfg: PipelineConfig, store: ArtifactStore, staging: Staging, k: str, on_log=None,
              api_key: SecretStr | None = None) -> None:
    gen = cfg.generate
    seeds, quarantined = ([], []) if gen.mode == "magpie" else load_seeds(gen)
    if gen.mode != "magpie" and not seeds:
        raise GenerationError(f"{gen.seeds}: no usable seed rows; quarantined: {quarantined[:5]}")
    if gen.mode == "magpie":  # before any model loads: a template we cannot read fails here
        gen = gen.model_copy(update={"magpie_pre_query_template": pre_query_template(gen)})
    if gen.teacher_kind == "openai":
        api_key = api_key or env_api_key(gen)
        if api_key is None and gen.api_key_secret:
            raise GenerationError(f"generate.api_key_secret '{gen.api_key_secret}' is a Prefect Secret block, read "
                                  f"only by the Prefect engine: run through Prefect, or set ${gen.api_key_env}")
        check_endpoint(gen, api_key)
    # distilabel forks its workers: run it from a clean spawned process (see synthtune.child)
    from synthtune.child import call_in_child

    rows, dropped = call_in_child(_run_distilabel, gen, seeds, k, work_url(store, k), str(staging.path / ".distilabel"),
                                  api_key, on_log=on_log, log_name="distilabel")
    _write(gen, staging, rows, len(seeds) or gen.magpie_rows, quarantined + dropped)


# ---------------------------------------------------------------- distilabel (in the child process)

def _llm(gen: GenerateConfig, model: str, magpie: bool = False, max_new_tokens: int | None = None):
    import torch

    if max_new_tokens:
        gen = gen.model_copy(update={"max_new_tokens": max_new_tokens})
    if gen.teacher_kind == "openai":
        from distilabel.models.llms import OpenAILLM

        key = env_api_key(gen) or SecretStr("not-needed")
        return OpenAILLM(model=model, base_url=gen.base_url, api_key=key, max_retries=gen.max_retries,
                         timeout=int(gen.timeout_s), generation_kwargs=generation_kwargs(gen))
    from distilabel.models.llms import TransformersLLM

    extra = {}
    if magpie:  # _generate has resolved the template
        extra = {"use_magpie_template": True, "magpie_pre_query_template": gen.magpie_pre_query_template}
    return TransformersLLM(model=resolve(model), device="cuda" if torch.cuda.is_available() else None,
                           torch_dtype="auto", generation_kwargs=generation_kwargs(gen), **extra)


def pre_query_template(gen: GenerateConfig) -> str:
    """What opens a user turn in the teacher's chat template (Magpie generates from there)."""
    if gen.magpie_pre_query_template:
        return gen.magpie_pre_query_template
    from synthtune.models import load_tokenizer

    template = load_tokenizer(gen.teacher).chat_template or ""
    if "<|im_start|>" in template:
        return "qwen2"
    if "<|start_header_id|>" in template:
        return "llama3"
    raise GenerationError(f"cannot tell where a user turn starts in {gen.teacher}'s chat template: "
                          "set generate.magpie_pre_query_template")


def _read_done(folder: str) -> list[dict]:
    import fsspec
    import pandas as pd

    fs, base = fsspec.core.url_to_fs(folder)
    files = sorted(fs.glob(f"{base}/batch-*.parquet")) if fs.exists(base) else []
    rows: list[dict] = []
    for name in files:
        with fs.open(name, "rb") as f:
            rows += pd.read_parquet(f).to_dict("records")
    return rows


def _pass(what: str, inputs: list[dict], folder: str, cache_dir: str, make_task, columns: list[str],
          batch_size: int, replicas: int = 1) -> list[dict]:
    """One distilabel task over `inputs` (each with a unique `id`), batch by batch. Batches finished
    by an earlier attempt (in `folder`) are not redone; a batch whose step raised fails the pass
    after the rest finished. Returns rows in input order (several per input for n generations)."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts, StepResources

    from synthtune.distil_steps import SaveBatches, step_failed

    done = _read_done(folder)
    finished = {r["id"] for r in done}
    todo = [r for r in inputs if r["id"] not in finished]
    fresh: list[dict] = []
    if finished:
        logging.getLogger("distilabel.synthtune").info("%s: %d of %d inputs finished by an earlier attempt, %d to go",
                                                       what, len(finished), len(inputs), len(todo))
    if todo:
        with Pipeline(name=f"synthtune-{what}", cache_dir=cache_dir) as pipeline:
            load = LoadDataFromDicts(data=todo, batch_size=batch_size)
            task = make_task(resources=StepResources(replicas=replicas))
            save = SaveBatches(folder=folder, columns=columns, input_batch_size=batch_size)
            load >> task >> save
        with distilabel_guard():
            distiset = pipeline.run(use_cache=False)
        fresh = distiset["default"]["train"].to_list()
    failed = sorted({r["id"] for r in fresh if step_failed(r)})
    if failed:
        raise GenerationError(
            f"{what}: the step raised for {len(failed)} of {len(inputs)} inputs (first: {failed[:3]}); the "
            f"{len(inputs) - len(failed)} finished are kept in {folder}, a retry redoes only the rest. "
            "See the distilabel log for the step's error.")
    order = {r["id"]: i for i, r in enumerate(inputs)}
    rows = [{c: r.get(c) for c in columns} for r in done + fresh]
    return sorted(rows, key=lambda r: order[r["id"]])


def _answers(gen: GenerateConfig, model: str, seeds: list[dict], what: str, work: str, cache_dir: str) -> list[dict]:
    import torch
    from distilabel.steps.tasks import TextGeneration

    torch.manual_seed(gen.seed)
    llm = _llm(gen, model)
    return _pass(what, seeds, f"{work}/{what}", cache_dir,
                 lambda **kw: TextGeneration(llm=llm, system_prompt=gen.system_prompt, num_generations=gen.num_generations,
                                             input_batch_size=gen.batch_size, add_raw_output=False, add_raw_input=False,
                                             **kw),
                 ["id", "instruction", "generation", "model_name"], gen.batch_size, gen.concurrency)


def _ratings(gen: GenerateConfig, items: list[dict], work: str, cache_dir: str) -> dict[str, dict]:
    """UltraFeedback over items {id, instruction, generations}: id -> {ratings, rationales}."""
    from distilabel.steps.tasks import UltraFeedback

    llm = _llm(gen, gen.judge, max_new_tokens=gen.judge_max_new_tokens)
    rows = _pass("judge", items, f"{work}/judge", cache_dir,
                 lambda **kw: UltraFeedback(llm=llm, aspect=gen.judge_aspect, input_batch_size=gen.batch_size,
                                            add_raw_output=False, add_raw_input=False, **kw),
                 ["id", "ratings", "rationales", "model_name"], gen.batch_size, gen.concurrency)
    return {r["id"]: r for r in rows}


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _run_distilabel(gen: GenerateConfig, seeds: list[dict], k: str, work: str, cache_dir: str,
                    api_key: SecretStr | None = None) -> tuple[list[dict], list[dict]]:
    """The rows of the stage (provenance columns included) and the quarantined ones with reasons."""
    if api_key is not None:  # this child's environment only: it ends with the child
        os.environ[gen.api_key_env] = api_key.get_secret_value()
    if gen.mode == "magpie":
        return _magpie(gen, work, cache_dir)
    dropped: list[dict] = []
    candidates: dict[str, list[dict]] = {s["id"]: [] for s in seeds}  # per seed: {text, model, index}
    for r in _answers(gen, gen.teacher, seeds, "teacher", work, cache_dir):
        candidates[r["id"]].append({"text": _text(r["generation"]), "model": gen.teacher,
                                    "index": len(candidates[r["id"]])})
    if gen.mode == "preference" and gen.rejected_model:
        weaker = gen.model_copy(update={"teacher_kind": "transformers", "num_generations": 1})
        for r in _answers(weaker, gen.rejected_model, seeds, "rejected", work, cache_dir):
            candidates[r["id"]].append({"text": _text(r["generation"]), "model": gen.rejected_model,
                                        "index": len(candidates[r["id"]])})
    for seed_id, cands in candidates.items():
        for c in cands:
            if c["text"] is None:
                dropped.append({"id": seed_id, "reason": f"{c['model']} returned no text (generation {c['index']})",
                                "empty": True})
        cands[:] = [c for c in cands if c["text"] is not None]
    prompts = {s["id"]: s["instruction"] for s in seeds}
    if gen.mode == "sft":
        rows = [{"id": i, "prompt": prompts[i], "response": c["text"], "teacher": gen.teacher, "generation_index": c["index"]}
                for i, cands in candidates.items() for c in cands]
        if gen.judge:  # each answer rated on its own
            rated = _ratings(gen, [{"id": f"{r['id']}#{r['generation_index']}", "instruction": r["prompt"],
                                    "generations": [r["response"]]} for r in rows], work, cache_dir)
            for r in rows:
                judged = rated[f"{r['id']}#{r['generation_index']}"]
                r.update(judge=gen.judge, rating=_first(judged["ratings"]), rationale=_first(judged["rationales"]))
        return rows, dropped
    return _preference_pairs(gen, prompts, candidates, work, cache_dir, dropped), dropped


def _first(values):
    return values[0] if isinstance(values, list | tuple) and len(values) else None


def _preference_pairs(gen: GenerateConfig, prompts: dict[str, str], candidates: dict[str, list[dict]], work: str,
                      cache_dir: str, dropped: list[dict]) -> list[dict]:
    """chosen/rejected per seed: by the judge's ratings (best vs worst), else teacher vs rejected_model."""
    enough = {i: c for i, c in candidates.items() if len(c) >= 2}
    for i in candidates.keys() - enough.keys():
        dropped.append({"id": i, "reason": "fewer than two answers to compare"})
    if gen.judge:
        rated = _ratings(gen, [{"id": i, "instruction": prompts[i], "generations": [c["text"] for c in cands]}
                               for i, cands in enough.items()], work, cache_dir)
    rows = []
    for i, cands in enough.items():
        if not gen.judge:
            chosen = next(c for c in cands if c["model"] == gen.teacher)
            rejected = next((c for c in cands if c["model"] == gen.rejected_model), None)
            if rejected is None:
                dropped.append({"id": i, "reason": f"{gen.rejected_model} gave no answer"})
                continue
            rows.append({"id": i, "prompt": prompts[i], "chosen": chosen["text"], "rejected": rejected["text"],
                         "teacher": gen.teacher, "generation_index": chosen["index"],
                         "chosen_model": chosen["model"], "rejected_model": rejected["model"]})
            continue
        picked = pick_pair(cands, rated[i]["ratings"], rated[i]["rationales"])
        if isinstance(picked, str):
            dropped.append({"id": i, "reason": f"judge {gen.judge} {picked}"})
            continue
        (c, rating, rationale), (r, rejected_rating, rejected_rationale) = picked
        rows.append({"id": i, "prompt": prompts[i], "chosen": c["text"], "rejected": r["text"], "teacher": gen.teacher,
                     "generation_index": c["index"], "chosen_model": c["model"], "rejected_model": r["model"],
                     "judge": gen.judge, "rating": rating, "rejected_rating": rejected_rating,
                     "rationale": rationale, "rejected_rationale": rejected_rationale})
    return rows


def pick_pair(cands: list[dict], ratings, rationales):
    """The best and the worst rated answer, each as (candidate, rating, rationale); or why there is
    no pair (ratings missing or unparsable, or all equal). The first of equally rated answers wins."""
    ratings, rationales = list(ratings or []), list(rationales or [])
    why = rationales + [None] * len(cands)
    scored = [(n, r) for n, r in enumerate(ratings[:len(cands)]) if isinstance(r, int | float)]
    if len(scored) < 2:
        return "rated fewer than two answers (unparsable output)"
    best = max(scored, key=lambda x: (x[1], -x[0]))
    worst = min(scored, key=lambda x: (x[1], -x[0]))
    if best[1] == worst[1]:
        return f"rated every answer {best[1]}"
    return (cands[best[0]], best[1], why[best[0]]), (cands[worst[0]], worst[1], why[worst[0]])


def _magpie(gen: GenerateConfig, work: str, cache_dir: str) -> tuple[list[dict], list[dict]]:
    """Instructions and answers both from the teacher (Magpie): nothing but the chat template's
    user-turn opening is given, the model writes the instruction, then answers it."""
    import torch
    from distilabel.steps.tasks import Magpie

    torch.manual_seed(gen.seed)
    llm = _llm(gen, gen.teacher, magpie=True)
    inputs = [{"id": f"magpie-{n}"} for n in range(gen.magpie_rows)]
    system = {"system_prompt": gen.system_prompt} if gen.system_prompt else {}
    out = _pass("magpie", inputs, f"{work}/magpie", cache_dir,
                lambda **kw: Magpie(llm=llm, n_turns=1, input_batch_size=gen.batch_size, **system, **kw),
                ["id", "instruction", "response", "model_name"], gen.batch_size)
    rows, dropped = [], []
    for r in out:
        instruction, response = _text(r["instruction"]), _text(r["response"])
        if instruction is None or response is None:
            missing = "instruction" if instruction is None else "response"
            dropped.append({"id": r["id"], "reason": f"{gen.teacher} wrote no {missing}", "empty": True})
            continue
        rows.append({"id": r["id"], "prompt": instruction, "response": response, "teacher": gen.teacher,
                     "generation_index": 0})
    return rows, dropped


def _write(gen: GenerateConfig, staging: Staging, rows: list[dict], asked: int, quarantined: list[dict]) -> None:
    import pandas as pd

    shutil.rmtree(staging.path / ".distilabel", ignore_errors=True)
    if not rows:
        raise GenerationError(f"teacher {gen.teacher} gave no usable rows for any of {asked} inputs; "
                              f"first reasons: {[q.get('reason') for q in quarantined[:3]]}")
    pd.DataFrame(rows).to_parquet(staging.path / "data.parquet", index=False)
    pd.DataFrame(quarantined, columns=["id", "file", "line", "reason"]).astype(str).to_parquet(
        staging.path / "quarantine.parquet", index=False)
    empty = sum(bool(q.get("empty")) for q in quarantined)
    staging.rows.update(seeds=asked, generated=len(rows), quarantined=len(quarantined), empty=empty)


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None,
        on_log=None, api_key: SecretStr | None = None) -> ArtifactRef:
    """Generate (or reuse) the synthetic rows. `on_log(record)` receives distilabel's log records
    (only `distilabel.*`: forwarding everything would loop through whoever listens). `api_key`, when
    given, wins over `$api_key_env` (the Prefect task passes a Secret block's value)."""
    k = key(cfg, {})
    ref = produce(store, STAGE, k, {}, key_payload(cfg.generate), lambda st: _generate(cfg, store, st, k, on_log, api_key))
    store.remove(STAGE, ".work", k)  # committed: its finished batches are no longer needed
    return ref
