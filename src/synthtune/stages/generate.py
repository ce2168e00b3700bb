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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from synthtune.configs import GenerateConfig
from synthtune.generation import Pass, Tally, assemble, http_pass, too_many_failed
from synthtune.keys import key_payload, stage_key
from synthtune.models import fingerprint, identity, resolve, revision_kw
from synthtune.rowcache import RowCache
from synthtune.seeds import SeedSet, read_seeds
from synthtune.store import ArtifactRef, ArtifactStore, Staging, produce
from synthtune.teacher import GenerationError, env_api_key
from synthtune.versions import stage_libs

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

__all__ = ["GenerateConfig", "GenerationError", "key", "load_seeds", "run"]

STAGE = "generate"
log = logging.getLogger("synthtune.generate")
VERSION = "4"


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """The generation settings that change answers, the seed files' contents, and the teacher's,
    judge's and rejected model's identities (a local model's files, or an endpoint and model name)."""
    gen = cfg.generate
    extra = {"rejected_model": fingerprint(gen.rejected_model)} if gen.mode == "preference" and gen.rejected_model else {}
    if gen.judge:
        extra["judge"] = identity(gen.judge, gen.teacher_kind, gen.base_url, gen.judge_revision)
    payload = {"generate": key_payload(gen), "libs": stage_libs(STAGE),
               "teacher": identity(gen.teacher, gen.teacher_kind, gen.base_url, gen.teacher_revision), **extra}
    return stage_key(STAGE, VERSION, payload, upstream)


def load_seeds(gen: GenerateConfig) -> SeedSet:
    """The usable seed rows and what was quarantined; raises SeedError when ids conflict."""
    return read_seeds(gen.seeds, gen.prompt_field)


# ---------------------------------------------------------------- row-cache keys


def cache_url(store: ArtifactStore) -> str:
    """Where the row cache lives: beside the stage's outputs, on any fsspec root."""
    return store.uri(STAGE, ".cache")


# ---------------------------------------------------------------- the teacher, before any generation


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
    identities = {"teacher": identity(gen.teacher, gen.teacher_kind, gen.base_url, gen.teacher_revision)}
    if gen.mode == "preference" and gen.rejected_model:
        identities["rejected"] = fingerprint(gen.rejected_model)
    if gen.judge:
        identities["judge"] = identity(gen.judge, gen.teacher_kind, gen.base_url, gen.judge_revision)
    check_budget(cfg, seeds, identities, store)  # before any request, even to /models
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
    api_key = api_key or (env_api_key(gen) if gen.teacher_kind == "openai" else None)
    tally = Tally()
    if gen.judge and gen.judge_calibration:  # before the teacher is asked anything
        staging.metrics["judge_calibration"] = check_judge(cfg, identities["judge"], store, api_key, on_log, tally)
    rows, dropped, tally = assemble(gen, seeds.rows, identities, cache_url(store),
                                    executor(gen, cache_url(store), api_key, on_log), tally)
    staging.usage["calls"] = {role: asdict(calls) for role, calls in tally.calls.items()}
    if why := too_many_failed(tally, tally.requests, gen.max_failed_share):
        raise GenerationError(why)
    _write(gen, staging, rows, seeds, dropped, {**tally.counts(), **lengths})
    if tally.replicas:
        staging.extra["replica_requests"] = tally.replicas
    for kind in ("answers", "magpie", "ratings"):  # many nights of small shards -> one per kind
        RowCache(f"{cache_url(store)}/{kind}").compact()


def check_budget(cfg: PipelineConfig, seeds: SeedSet, identities: dict[str, str], store: ArtifactStore) -> None:
    """Over cost.max_teacher_requests or max_teacher_usd: BudgetError naming the count, the budget and the
    seed files, before anything is asked (synthtune.budget). Counting costs a row-cache lookup."""
    from synthtune import budget
    from synthtune.generation import calibration_items, planned, uncached_ratings

    cost, gen = cfg.cost, cfg.generate
    if cost.max_teacher_requests is None and cost.max_teacher_usd is None:
        return
    calibration = 0
    if gen.judge and gen.judge_calibration:
        from synthtune import judging

        items = [i for part in calibration_items(judging.load(gen.judge_calibration, gen.judge_accept_rating))
                 for i in part]
        calibration = uncached_ratings(gen, identities["judge"], items, cache_url(store))
    plan = planned(gen, seeds.rows, identities, cache_url(store), calibration)
    budget.check_teacher(cost, plan, str(gen.seeds))
    log.info("tonight's teacher requests: %d to the teacher, %d to the judge (within the budget)",
             plan["teacher"], plan["judge"])


def check_judge(cfg: PipelineConfig, judge_id: str, store: ArtifactStore, api_key: SecretStr | None, on_log=None,
                tally: Tally | None = None) -> dict:
    """The judge's calibration report (synthtune.judging), or CalibrationError naming the figure below
    its minimum: the run stops before generation."""
    from synthtune import judging
    from synthtune.generation import calibrate

    gen = cfg.generate
    labels = judging.load(gen.judge_calibration, gen.judge_accept_rating)
    report = calibrate(gen, judge_id, labels, cache_url(store), executor(gen, cache_url(store), api_key, on_log), tally)
    position = report["position"]
    failed = []
    if report["kappa"] < gen.judge_min_kappa:
        failed.append(f"Cohen's kappa {report['kappa']:.3f} < generate.judge_min_kappa {gen.judge_min_kappa} "
                      f"(agreement {report['agreement']:.0%} on {report['items']} answers, {report['unrated']} unrated; "
                      f"rejections: precision {report['reject_precision']}, recall {report['reject_recall']})")
    if position["share"] is not None and position["share"] < gen.judge_min_position_consistency:
        failed.append(f"position consistency {position['share']:.0%} ({position['consistent']} of {position['pairs']} "
                      f"pairs rated alike in swapped order) < generate.judge_min_position_consistency "
                      f"{gen.judge_min_position_consistency:.0%}")
    share = "-" if position["share"] is None else f"{position['share']:.0%}"
    summary = (f"judge {gen.judge} on {Path(gen.judge_calibration).name}: kappa {report['kappa']:.3f}, "
               f"position consistency {share}")
    if failed:
        raise judging.CalibrationError(f"{summary}: the judge disagrees with its calibration labels; the teacher was "
                                       "not asked anything:\n  - " + "\n  - ".join(failed))
    log.info("%s: ok", summary)
    return report


def executor(gen: GenerateConfig, cache_url: str, api_key: SecretStr | None, on_log=None):
    """How a pass's misses are asked for: an HTTP model through the window in this process (no child:
    the first request leaves within seconds), a local model in a spawned child, anything on Ray through
    the replicas (synthtune.generation)."""
    from synthtune.child import call_in_child
    from synthtune.stages._distilabel_run import local_pass, ray_pass

    def execute(p: Pass, tally: Tally) -> dict[str, dict]:
        if gen.engine == "ray":
            found, stats = call_in_child(ray_pass, gen, p, cache_url, api_key, on_log=on_log, log_name="distilabel")
        elif p.http:
            found, window = http_pass(gen, p, cache_url, api_key, on_progress=_progress(p))
            stats = {"failed": window.failed, "retries": window.retries, "failures": window.failures,
                     "sent": len(p.inputs) + window.retries, "tokens": window.tokens}
        else:
            found, stats = call_in_child(local_pass, gen, p, cache_url, on_log=on_log, log_name="distilabel")
        calls = tally.of(p.what)
        calls.add(stats)
        calls.tokens = "api" if p.http else "tokenizer"
        tally.requests += len(p.inputs)
        tally.failed += stats["failed"]
        tally.retries += stats["retries"]
        tally.failures.update(stats["failures"])
        tally.replicas += stats.get("per_replica", [])
        for key, reason in stats["failures"].items():
            log.warning("%s: gave up on a request (%s...): %s", p.what, key[:12], reason)
        return found

    return execute


def _progress(p: Pass):
    """The window's progress as `generate` events (the terminal's live line), four a second at most."""
    import time

    from synthtune import progress

    last = [0.0]

    def report(stats) -> None:
        now = time.monotonic()
        if now - last[0] > 0.25 or stats.done + stats.failed == stats.total:
            last[0] = now
            progress.emit("generate", what=p.what, done=stats.done, total=stats.total, in_flight=stats.in_flight,
                          retries=stats.retries, rows_per_s=round(stats.rows_per_s, 1))

    return report


def _write(gen: GenerateConfig, staging: Staging, rows: list[dict], seeds: SeedSet, dropped: list[dict],
           counts: dict[str, int]) -> None:
    import pandas as pd

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
        output_key: str | None = None, rebuild: bool = False, on_log=None, api_key: SecretStr | None = None
        ) -> ArtifactRef:
    """Generate (or reuse) the synthetic rows. `on_log(record)` receives distilabel's log records
    (only `distilabel.*`: forwarding everything would loop through whoever listens). `api_key`, when
    given, wins over `$api_key_env` (the Prefect task passes a Secret block's value)."""
    k = output_key or key(cfg, {})

    def build(staging: Staging) -> None:
        with _forwarding(on_log):
            _generate(cfg, store, staging, on_log, api_key)

    gen = cfg.generate  # a local teacher (or rejected model) holds the machine's GPUs while it generates
    local = gen.teacher_kind != "openai" or (gen.mode == "preference" and bool(gen.rejected_model))
    return produce(store, STAGE, k, {}, key_payload(gen), build, rebuild, devices=local)


@contextlib.contextmanager
def _forwarding(on_log):
    """The stage's own log records (and distilabel's, made in this process) to `on_log` as well: the
    HTTP window runs here, not in a child whose records are forwarded already."""
    if on_log is None:
        yield
        return

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                on_log(record)

    handler, loggers = Forward(level=logging.INFO), [logging.getLogger(n) for n in ("synthtune.generate", "distilabel")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(min(lg.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
