"""generate's settings: the teacher, the seeds, the mode, and how requests reach the teacher."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError, ValidationInfo, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from synthtune.fields import InputFile, ModelRef, Section, SeedSource, base_dir, field, resolve_model


class GenerateConfig(Section):
    """The teacher (a local transformers model or an OpenAI-compatible endpoint), the seeds, the mode
    (sft, preference with an optional judge, magpie), the generation settings that change answers (in
    the key) and how requests reach the teacher (not in the key)."""

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
    judge_calibration: InputFile | None = field(
        None, "Labelled answers ({prompt, response, rating 1-5 or accept}) the judge rates before any real row "
        "(synthtune.judging): the run reports Cohen's kappa, the precision and recall of its rejections and its "
        "position consistency, and stops before generation below the minimums.")
    judge_accept_rating: float = field(4, "A rating (the judge's or a human's) at or above this accepts an answer.",
                                       ge=1, le=5)
    judge_min_kappa: float = field(0.4, "Least Cohen's kappa between the judge and the calibration labels.", ge=-1, le=1)
    judge_min_position_consistency: float = field(
        0.9, "Least share of calibration pairs the judge prefers the same way when shown in swapped order.", ge=0, le=1)
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
    max_retries: int = field(
        6, "Retries of a request with exponential backoff on HTTP 5xx, timeouts and dropped connections; 429 and 503 "
        "wait as long as their Retry-After says. A request still failing is quarantined with its reason.", ge=0,
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
    batch_size: int = field(
        8, "A local teacher: seeds per generate() call (batched generation). An HTTP teacher: finished answers per "
        "row-cache shard (they are also written every 2 s, so a crash loses at most the requests in flight). Changes "
        "no answer: not in the cache key.", ge=1, le=4096, affects_output=False)
    concurrency: int = field(
        64, "An HTTP teacher: requests in flight at once, from one process and one event loop; a finished request "
        "frees its slot at once. Throttling (429/503) halves it for a while. Per replica with engine=ray. A local "
        "teacher ignores it (batch_size sets its batches).", ge=1, le=4096, affects_output=False)
    replicas: int = field(
        1, "engine=ray: teacher replicas, each a Ray actor working on its share of the seeds: an HTTP teacher's "
        "window of `concurrency` requests (requests in flight = replicas x concurrency), or a local teacher's own "
        "copy of the model (with ray_gpus_per_replica GPUs). engine=local: 1.", ge=1, le=256, affects_output=False)
    max_requests_per_s: float | None = field(
        None, "An HTTP teacher's published request limit: at most this many requests start per second. Empty: no "
        "limit but the server's own 429s.", gt=0, affects_output=False)
    max_tokens_per_min: int | None = field(
        None, "An HTTP teacher's published token limit per minute (prompt + max_new_tokens estimated per request). "
        "Empty: no limit.", gt=0, affects_output=False)
    max_failed_share: float = field(
        0.05, "Requests the teacher still fails after max_retries (or refuses as malformed) are quarantined with "
        "their reason, up to this share of a run's requests; above it the stage fails (the teacher is down, not "
        "one prompt), keeping every finished answer in the row cache for the retry.", ge=0, le=1,
        affects_output=False)
    engine: Literal["local", "ray"] = field(
        "local", "Where the teacher is driven: `local` (this machine) or `ray` (`replicas` Ray actors; pip install "
        "'synthtune[ray]').", affects_output=False)
    ray_address: str = field(
        "", "engine=ray: the cluster to use (`ray://head:10001`, or `auto` on a cluster node). Empty: start a local "
        "Ray cluster for the run.", affects_output=False)
    ray_gpus_per_replica: int = field(0, "engine=ray: GPUs each teacher replica asks Ray for (0: none).", ge=0,
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
        if self.judge_calibration and not self.judge:
            raise ValueError("judge_calibration is set but there is no judge to calibrate")
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
