"""generate: synthetic answers from a teacher model through distilabel, paying only for what is new.

Seeds come from a file, a folder or a glob on any fsspec URL (synthtune.seeds): every row remembers
its file and line, and bad rows are quarantined before any model loads. The teacher is a local
transformers model (distilabel's `TransformersLLM`) or an OpenAI-compatible endpoint (`OpenAILLM`,
retried with backoff, the key read from an environment variable or a Prefect Secret block). In
preference mode a second, weaker model answers the same seeds, and a judge may rate the answers
(UltraFeedback). Magpie mode needs no seeds.

Every answer and rating is kept in the row-level cache on the artifact root (synthtune.rowcache),
keyed by what determines it: a night with 50 new seeds asks the teacher for 50 answers, a retry
after a crash asks only for what has no answer yet, a removed seed drops out and an edited one is
regenerated. distilabel's own cache is never used (it restores whole steps and ignores changed
input). distilabel runs in a spawned child process (stages/_distilabel_run.py); its `distilabel.*`
records are forwarded to the caller.

Run as: synthtune generate configs/demo.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr, ValidationError, ValidationInfo, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from synthtune.artifacts import ArtifactRef, ArtifactStore, Staging, key_payload, produce, stage_key
from synthtune.fields import ModelRef, Section, SeedSource, base_dir, field, resolve_model
from synthtune.models import fingerprint, identity, resolve, revision_kw
from synthtune.rowcache import RowCache, entry_key
from synthtune.seeds import SeedSet, read_seeds
from synthtune.versions import stage_libs

if TYPE_CHECKING:
    from synthtune.config import PipelineConfig

STAGE = "generate"
VERSION = "4"


class GenerateConfig(Section):
    teacher: str = field(
        ..., "Teacher model: a Hugging Face id, a local folder or `tiny:teacher` (kind transformers), or the model "
        "name an OpenAI-compatible server knows (kind openai).", resolved=True)  # keyed by its identity
    mode: Literal["sft", "preference", "magpie"] = field(
        "sft", "`sft`: seed prompt -> teacher response. `preference`: several answers per prompt (the teacher's "
        "`num_generations`, plus `rejected_model`'s); with a `judge` the best rated is `chosen` and the worst "
        "`rejected`, without one the teacher's answer is `chosen` and `rejected_model`'s `rejected`. `magpie`: "
        "no seeds; a local instruct teacher writes the instructions too (Magpie), `magpie_rows` of them.")
    teacher_revision: str | None = field(
        None, "Hub revision (branch, tag or commit) of a local teacher, pinned for every load and in the cache keys.")
    rejected_model: ModelRef | None = field(
        None, "Preference mode: a local model whose answers join the candidates (e.g. tiny:student or the student id); "
        "needed without a judge, where its answer is `rejected`.", resolved=True)
    judge: str | None = field(
        None, "Model that rates answers with distilabel's UltraFeedback (1-5 with a rationale, columns `rating` and "
        "`rationale`); same kind and endpoint as the teacher. Empty: no judge.", resolved=True)
    judge_revision: str | None = field(None, "Hub revision of a local judge, pinned like teacher_revision.")
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
    seeds: SeedSource | None = field(
        None, "Seed rows: a JSONL or parquet file, a folder of them, a glob (`data/seeds/*.jsonl`) or any fsspec URL "
        "(`s3://bucket/seeds/date=*/part-*.parquet`), or a `datasets` folder (save_to_disk); each row needs an `id` and "
        "the prompt field. Files are read in sorted order. Needed except in magpie mode.")
    prompt_field: str = field("prompt", "Name of the field in each seed row that holds the instruction.")
    system_prompt: str | None = field(None, "System prompt sent to the teacher with every seed.")
    max_new_tokens: int = field(128, "Most tokens the teacher may write per answer.", ge=1, le=32768)
    temperature: float = field(0.0, "Sampling temperature; 0 means greedy decoding.", ge=0, le=5)
    num_generations: int = field(1, "Answers generated per seed.", ge=1, le=64)
    batch_size: int = field(8, "Seeds sent to the teacher per batch (an HTTP teacher gets a batch's requests "
                            "at once).", ge=1, le=4096)
    engine: Literal["local", "ray"] = field(
        "local", "Where distilabel runs: `local` (processes on this machine) or `ray` (the same pipeline as a "
        "RayPipeline: each teacher replica a Ray actor; pip install 'synthtune[ray]').", affects_output=False)
    ray_address: str = field(
        "", "engine=ray: the cluster to use (`ray://head:10001`, or `auto` on a cluster node). Empty: start a local "
        "Ray cluster for the run.", affects_output=False)
    ray_gpus_per_replica: int = field(0, "engine=ray: GPUs each teacher replica asks Ray for (0: none).", ge=0,
                                      affects_output=False)
    concurrency: int = field(1, "Batches in flight at once (distilabel replicas of the step): more load on an HTTP "
                             "teacher; a local teacher loads one copy of the model per replica.", ge=1, le=64,
                             affects_output=False)
    seed: int = field(0, "Random seed for sampling.")
    max_prompt_tokens: int | None = field(
        None, "Longest seed prompt, in teacher tokens. Empty: a local teacher's context minus max_new_tokens; an HTTP "
        "teacher's `max_model_len` when its /models reports one (vLLM), else unchecked.", ge=1)
    long_prompts: Literal["quarantine", "truncate"] = field(
        "quarantine", "Seed prompts over max_prompt_tokens: `quarantine` them (with the reason) or `truncate` them "
        "(keep the end, where the question usually is). Either way they are counted.")

    @model_validator(mode="before")
    @classmethod
    def _local_models(cls, data: Any, info: ValidationInfo) -> Any:
        """A local teacher or judge given as a folder must exist (an endpoint's model names are its own)."""
        if isinstance(data, dict) and data.get("teacher_kind", "transformers") == "transformers":
            data = dict(data)
            for name in ("teacher", "judge"):
                if isinstance(data.get(name), str):
                    try:
                        data[name] = resolve_model(data[name], base_dir(info))
                    except ValueError as e:  # reported at generate.<name>, like a field's own error
                        raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                            type=PydanticCustomError("model_folder", "{message}", {"message": str(e)}),
                            loc=(name,), input=data[name])]) from None
        return data

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
        if self.teacher_kind == "openai" and not self.base_url:
            raise ValueError("teacher_kind=openai needs base_url (the OpenAI-compatible endpoint, e.g. "
                             "http://127.0.0.1:8000/v1)")
        return self


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    gen = cfg.generate
    extra = {"rejected_model": fingerprint(gen.rejected_model)} if gen.mode == "preference" and gen.rejected_model else {}
    if gen.judge:
        extra["judge"] = identity(gen.judge, gen.teacher_kind, gen.base_url, gen.judge_revision)
    payload = {"generate": key_payload(gen), "libs": stage_libs(STAGE),
               "teacher": identity(gen.teacher, gen.teacher_kind, gen.base_url, gen.teacher_revision), **extra}
    return stage_key(STAGE, VERSION, payload, upstream)


class GenerationError(RuntimeError):
    pass


def load_seeds(gen: GenerateConfig) -> SeedSet:
    """The usable seed rows and what was quarantined; raises SeedError when ids conflict."""
    return read_seeds(gen.seeds, gen.prompt_field)


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


# ---------------------------------------------------------------- row-cache keys


def answer_key(gen: GenerateConfig, model: str, prompt: str, index: int) -> str:
    """Row-cache key of one answer: what determines it, nothing else (never the seed's id or file)."""
    return entry_key(kind="answer", model=model, mode=gen.mode, generation=generation_kwargs(gen), seed=gen.seed,
                     system_prompt=gen.system_prompt, prompt=prompt, index=index)


def magpie_key(gen: GenerateConfig, model: str, index: int) -> str:
    return entry_key(kind="magpie", model=model, generation=generation_kwargs(gen), seed=gen.seed,
                     system_prompt=gen.system_prompt, pre_query=gen.magpie_pre_query_template, index=index)


def rating_key(gen: GenerateConfig, judge: str, instruction: str, generations: list[str]) -> str:
    """Row-cache key of one judge verdict: the judge and exactly the candidates it rated, in order."""
    return entry_key(kind="rating", judge=judge, aspect=gen.judge_aspect, max_new_tokens=gen.judge_max_new_tokens,
                     generation=generation_kwargs(gen), instruction=instruction, generations=generations)


def cache_url(store: ArtifactStore) -> str:
    """Where the row cache lives: beside the stage's outputs, on any fsspec root."""
    return store.uri(STAGE, ".cache")


# ---------------------------------------------------------------- the teacher, before any generation


def env_api_key(gen: GenerateConfig) -> SecretStr | None:
    value = os.environ.get(gen.api_key_env)
    return SecretStr(value) if value else None


def check_endpoint(gen: GenerateConfig, api_key: SecretStr | None) -> int | None:
    """The OpenAI-compatible teacher answers `GET /models`, retried with backoff like generation
    requests; one that stays down fails naming the endpoint and the last error. Returns the teacher's
    context length when the server reports one (vLLM's `max_model_len`)."""
    import json
    import time
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
    request = urllib.request.Request(gen.base_url.rstrip("/") + "/models", headers=headers)
    last = None
    for attempt in range(gen.max_retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=gen.timeout_s) as response:
                if response.status < 400:
                    try:
                        models = json.loads(response.read()).get("data") or []
                    except (ValueError, AttributeError):
                        models = []
                    return next((m.get("max_model_len") for m in models
                                 if isinstance(m, dict) and m.get("id") == gen.teacher), None)
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code not in (408, 409, 429) and e.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        time.sleep(min(0.5 * 2 ** attempt, 20))
    raise GenerationError(f"teacher endpoint {gen.base_url} is not answering after {gen.max_retries + 1} tries; "
                          f"last error: {last}")


def teacher_context(gen: GenerateConfig) -> int | None:
    """A local teacher's context length (tokens), from its config and tokenizer."""
    from transformers import AutoConfig

    from synthtune.models import load_tokenizer

    config = AutoConfig.from_pretrained(resolve(gen.teacher), **revision_kw(gen.teacher_revision))
    sizes = [getattr(config, "max_position_embeddings", None),
             load_tokenizer(gen.teacher, gen.teacher_revision).model_max_length]
    sizes = [n for n in sizes if isinstance(n, int) and 0 < n < 10**7]
    return min(sizes) if sizes else None


def _prompt_tokenizer(gen: GenerateConfig):
    """The teacher's tokenizer where it loads without a download, else None (lengths are then estimated)."""
    from synthtune.models import load_tokenizer

    try:
        return load_tokenizer(gen.teacher, gen.teacher_revision)
    except Exception:  # a hosted model: no tokenizer here
        return None


def fit_prompts(gen: GenerateConfig, seeds: SeedSet, context: int | None) -> dict[str, int]:
    """Apply the long-prompt policy to the seed rows in place; returns the counts (too_long, truncated)."""
    limit = gen.max_prompt_tokens or (context - gen.max_new_tokens if context else None)
    counts = {"too_long": 0, "truncated": 0}
    if not limit or limit <= 0:
        return counts
    # a prompt of at most `limit` UTF-8 bytes has at most `limit` tokens: only longer ones are tokenized
    long = [r for r in seeds.rows if len(r["instruction"].encode()) > limit]
    if not long:
        return counts
    tok = _prompt_tokenizer(gen)
    ids = tok([r["instruction"] for r in long], add_special_tokens=False)["input_ids"] if tok else [None] * len(long)
    over = set()
    for row, row_ids in zip(long, ids, strict=True):
        n = len(row_ids) if row_ids is not None else len(row["instruction"].encode()) // 4
        if n <= limit:
            continue
        if gen.long_prompts == "truncate":
            row["instruction"] = (tok.decode(row_ids[-limit:]) if row_ids is not None
                                  else row["instruction"].encode()[-4 * limit:].decode("utf-8", "ignore"))
            counts["truncated"] += 1
            continue
        over.add(id(row))
        how = "" if row_ids is not None else " (estimated at 4 bytes a token)"
        seeds.quarantined.append({"file": row["seed_file"], "line": row["seed_line"], "id": row["id"],
                                  "reason": f"prompt is {n} tokens{how}, over the teacher's limit of {limit} "
                                            "(generate.max_prompt_tokens; long_prompts=truncate keeps its end)"})
    seeds.rows[:] = [r for r in seeds.rows if id(r) not in over]
    counts["too_long"] = len(over)
    return counts


def pre_query_template(gen: GenerateConfig) -> str:
    """What opens a user turn in the teacher's chat template (Magpie generates from there)."""
    if gen.magpie_pre_query_template:
        return gen.magpie_pre_query_template
    from synthtune.models import load_tokenizer

    template = load_tokenizer(gen.teacher, gen.teacher_revision).chat_template or ""
    if "<|im_start|>" in template:
        return "qwen2"
    if "<|start_header_id|>" in template:
        return "llama3"
    raise GenerationError(f"cannot tell where a user turn starts in {gen.teacher}'s chat template: "
                          "set generate.magpie_pre_query_template")


# ---------------------------------------------------------------- the stage


def _generate(cfg: PipelineConfig, store: ArtifactStore, staging: Staging, on_log=None,
              api_key: SecretStr | None = None) -> None:
    gen = cfg.generate
    seeds = SeedSet() if gen.mode == "magpie" else load_seeds(gen)  # before any model loads
    if gen.mode != "magpie" and not seeds.rows:
        raise GenerationError(f"{gen.seeds}: no usable seed rows; quarantined: {seeds.quarantined[:5]}")
    if gen.mode == "magpie":  # before any model loads: a template we cannot read fails here
        gen = gen.model_copy(update={"magpie_pre_query_template": pre_query_template(gen)})
    context = None
    if gen.teacher_kind == "openai":
        api_key = api_key or env_api_key(gen)
        if api_key is None and gen.api_key_secret:
            raise GenerationError(f"generate.api_key_secret '{gen.api_key_secret}' is a Prefect Secret block, read "
                                  f"only by the Prefect engine: run through Prefect, or set ${gen.api_key_env}")
        context = check_endpoint(gen, api_key)
    elif gen.mode != "magpie":
        context = teacher_context(gen)
    lengths = fit_prompts(gen, seeds, context)
    identities = {"teacher": identity(gen.teacher, gen.teacher_kind, gen.base_url, gen.teacher_revision)}
    if gen.mode == "preference" and gen.rejected_model:
        identities["rejected"] = fingerprint(gen.rejected_model)
    if gen.judge:
        identities["judge"] = identity(gen.judge, gen.teacher_kind, gen.base_url, gen.judge_revision)
    # distilabel forks its workers: run it from a clean spawned process (see synthtune.child)
    from synthtune.child import call_in_child
    from synthtune.stages._distilabel_run import run_distilabel

    rows, dropped, counts = call_in_child(run_distilabel, gen, seeds.rows, identities, cache_url(store),
                                          str(staging.path / ".distilabel"), api_key, on_log=on_log,
                                          log_name="distilabel")
    _write(gen, staging, rows, seeds, dropped, {**counts, **lengths})
    for kind in ("answers", "magpie", "ratings"):  # many nights of small shards -> one per kind
        RowCache(f"{cache_url(store)}/{kind}").compact()


def _write(gen: GenerateConfig, staging: Staging, rows: list[dict], seeds: SeedSet, dropped: list[dict],
           counts: dict[str, int]) -> None:
    import pandas as pd

    shutil.rmtree(staging.path / ".distilabel", ignore_errors=True)
    asked = len(seeds.rows) or gen.magpie_rows
    where = {r["id"]: {"file": r["seed_file"], "line": r["seed_line"]} for r in seeds.rows}
    quarantined = seeds.quarantined + [{**where.get(d["id"], {}), **d} for d in dropped]
    if not rows:
        raise GenerationError(f"teacher {gen.teacher} gave no usable rows for any of {asked} inputs; "
                              f"first reasons: {[q.get('reason') for q in quarantined[:3]]}")
    pd.DataFrame(rows).to_parquet(staging.path / "data.parquet", index=False)
    pd.DataFrame(quarantined, columns=["id", "file", "line", "reason"]).astype(str).to_parquet(
        staging.path / "quarantine.parquet", index=False)
    counts["new"] = counts.pop("new_rows", 0)
    if not gen.judge:
        counts = {k: v for k, v in counts.items() if not k.startswith("ratings_")}
    staging.rows.update(seeds=asked, output=len(rows), **counts, quarantined=len(quarantined),
                        empty=sum(bool(d.get("empty")) for d in dropped), duplicates=seeds.duplicates)
    staging.extra["seed_files"] = seeds.files


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef] | None = None,
        on_log=None, api_key: SecretStr | None = None) -> ArtifactRef:
    """Generate (or reuse) the synthetic rows. `on_log(record)` receives distilabel's log records
    (only `distilabel.*`: forwarding everything would loop through whoever listens). `api_key`, when
    given, wins over `$api_key_env` (the Prefect task passes a Secret block's value)."""
    k = key(cfg, {})
    return produce(store, STAGE, k, {}, key_payload(cfg.generate), lambda st: _generate(cfg, store, st, on_log, api_key))
