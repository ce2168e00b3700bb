"""How the generate stage gets its answers and ratings: it asks only for what the row cache lacks, in
passes (the teacher's answers, the rejected model's, the judge's ratings, or Magpie's rows), each on
the executor its model needs, then assembles rows in seed order.

distilabel stays the generation framework: its tasks (TextGeneration, UltraFeedback, Magpie) build
every prompt and parse every reply, and its LLM classes (OpenAILLM, TransformersLLM) talk to the
models. What changed is how requests reach them:

- an HTTP teacher or judge (`teacher_kind: openai`): a steady window of `concurrency` requests in
  flight (synthtune.window), in this process, one event loop; a finished request frees its slot at
  once, and finished answers reach the row cache every `batch_size` rows or half a second, so a
  crash loses at most the unfinished window. distilabel's task builds each request's messages and
  parses each reply; the OpenAI-compatible request itself goes out over one aiohttp session (0.3 ms
  of CPU a request; the openai SDK's client costs 4 ms, and 21 ms with a kept-alive connection per
  request in flight, which leaves a 2-core machine CPU-bound far below the teacher's speed:
  bench/generate.py). The tasks are driven without distilabel's Pipeline: no batch barrier, no step
  processes, and none of its per-batch `_cache()` (distilabel 1.5.3 re-saves the pipeline and
  recomputes its signature after every batch, even with its cache off: 15.5 of 23.6 CPU-seconds of
  a 4,000-row run);
- a local transformers model: batched generation (`batch_size` rows a call), the task driven batch by
  batch in a spawned child (stages/_distilabel_run.py), each batch written to the row cache;
- engine=ray: `replicas` Ray actors, the misses split between them, each an HTTP window of its own
  (requests in flight = replicas x concurrency) or a local model copy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from synthtune.configs import GenerateConfig
from synthtune.rowcache import RowCache
from synthtune.teacher import GenerationError, answer_key, env_api_key, generation_kwargs, magpie_key, rating_key

log = logging.getLogger("synthtune.generate")
FLUSH_S = 0.5  # finished answers reach the row cache at least this often


ROLES = {"teacher": "teacher", "magpie": "teacher", "judge": "judge", "rejected": "rejected"}  # pass -> who is billed


@dataclass
class Calls:
    """What one model was asked tonight (the ledger's teacher and judge lines): requests sent (every
    attempt, retries included: what the server sees), retries, requests given up, answers the row
    cache held (not asked), and tokens from the API's `usage` (`tokens: api`) or counted with a local
    model's tokenizer (`tokens: tokenizer`)."""

    requests: int = 0
    retries: int = 0
    failed: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: str = "api"

    def add(self, stats: dict) -> None:
        self.requests += stats["sent"]
        self.retries += stats["retries"]
        self.failed += stats["failed"]
        self.prompt_tokens += stats.get("tokens", {}).get("prompt", 0)
        self.completion_tokens += stats.get("tokens", {}).get("completion", 0)


def row_tokens(row: dict) -> tuple[int, int]:
    """(prompt, completion) tokens of a row a distilabel task made with a local model: its
    `distilabel_metadata` statistics, counted by distilabel with the model's tokenizer."""
    def count(values) -> int:  # one number, or one per generation
        if isinstance(values, list):
            return sum(v for v in values if isinstance(v, int))
        return values if isinstance(values, int) else 0

    prompt = completion = 0
    for name, stats in (row.get("distilabel_metadata") or {}).items():
        if name.startswith("statistics_") and isinstance(stats, dict):
            prompt += count(stats.get("input_tokens"))
            completion += count(stats.get("output_tokens"))
    return prompt, completion


@dataclass
class Tally:
    """Answers (and ratings) reused from the cache vs produced now, requests given up, and rows holding
    a new answer."""

    reused: int = 0
    generated: int = 0
    ratings_reused: int = 0
    ratings_generated: int = 0
    new_rows: int = 0
    failed: int = 0
    retries: int = 0
    requests: int = 0
    fresh: set[str] = field(default_factory=set)  # answer keys produced now
    failures: dict[str, str] = field(default_factory=dict)  # request key -> why it was given up
    replicas: list[int] = field(default_factory=list)  # engine=ray: requests each replica was given
    calls: dict[str, Calls] = field(default_factory=dict)  # who was asked (teacher, judge, rejected): the ledger

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k not in ("fresh", "failures", "replicas", "calls")}

    def of(self, what: str) -> Calls:
        return self.calls.setdefault(ROLES.get(what, what), Calls())


@dataclass(frozen=True)
class Pass:
    """One kind of request for one model: what (teacher, rejected, judge, magpie), the task that formats
    and parses them, the fields kept in the row cache, and the inputs (each `id` its cache key)."""

    what: str
    model: str
    http: bool
    task: str  # text_generation | ultrafeedback | magpie
    cache: str  # answers | ratings | magpie
    fields: tuple[str, ...]
    required: tuple[str, ...]
    inputs: tuple[dict, ...]
    revision: str | None = None
    max_new_tokens: int | None = None


def make_llm(gen: GenerateConfig, p: Pass, api_key: SecretStr | None = None):
    """The distilabel LLM of a pass, loaded. For an HTTP model it only serves the task (which loads it);
    its requests go through the window (`http_pass`)."""
    if p.max_new_tokens:
        gen = gen.model_copy(update={"max_new_tokens": p.max_new_tokens})
    if p.http:
        from distilabel.models.llms import OpenAILLM

        llm = OpenAILLM(model=p.model, base_url=gen.base_url, api_key=SecretStr("not-used"), max_retries=0,
                        generation_kwargs=generation_kwargs(gen))
        llm.load()
        return llm
    import torch
    from distilabel.models.llms import TransformersLLM

    from synthtune.models import resolve

    extra = {}
    if p.task == "magpie":  # the parent has resolved the template
        extra = {"use_magpie_template": True, "magpie_pre_query_template": gen.magpie_pre_query_template}
    llm = TransformersLLM(model=resolve(p.model), revision=p.revision or "main",
                         device="cuda" if torch.cuda.is_available() else None, torch_dtype="auto",
                         generation_kwargs=generation_kwargs(gen), **extra)
    llm.load()
    return llm


def make_task(gen: GenerateConfig, p: Pass, llm):
    """The distilabel task of a pass, loaded (inside a Pipeline context it never runs: a task outside one
    warns that it has none)."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps.tasks import Magpie, TextGeneration, UltraFeedback

    with Pipeline(name=f"synthtune-{p.what}"):
        if p.task == "ultrafeedback":
            task = UltraFeedback(llm=llm, aspect=gen.judge_aspect, add_raw_output=False, add_raw_input=False,
                                 input_batch_size=gen.batch_size)
        elif p.task == "magpie":
            system = {"system_prompt": gen.system_prompt} if gen.system_prompt else {}
            task = Magpie(llm=llm, n_turns=1, input_batch_size=gen.batch_size, **system)
        else:
            task = TextGeneration(llm=llm, system_prompt=gen.system_prompt, num_generations=1, add_raw_output=False,
                                  add_raw_input=False, input_batch_size=gen.batch_size)
    task.load()
    return task


def usable(row: dict, required: tuple[str, ...]) -> bool:
    """A reply worth keeping: every required field present (an empty answer is never cached)."""
    def present(value) -> bool:
        if isinstance(value, str):
            return bool(value.strip())
        if isinstance(value, list | tuple):
            return any(v is not None for v in value)
        return value is not None

    return all(present(row.get(f)) for f in required)


class CacheWriter:
    """Finished replies, written to the row cache as shards of `every` rows, or whatever is there after
    `FLUSH_S` seconds (`flush_due`)."""

    def __init__(self, cache: RowCache, fields: tuple[str, ...], every: int):
        self.cache, self.fields, self.every = cache, fields, max(1, every)
        self.rows: list[dict] = []
        self.at = time.monotonic()

    def add(self, key: str, row: dict) -> list[dict] | None:
        self.rows.append({"key": key, **{f: row.get(f) for f in self.fields}})
        return self.take() if len(self.rows) >= self.every else None

    def flush_due(self) -> list[dict] | None:
        return self.take() if self.rows and time.monotonic() - self.at >= FLUSH_S else None

    def take(self) -> list[dict]:
        rows, self.rows, self.at = self.rows, [], time.monotonic()
        return rows


def http_pass(gen: GenerateConfig, p: Pass, cache_url: str, api_key: SecretStr | None = None,
              concurrency: int | None = None, on_progress: Callable | None = None) -> tuple[dict[str, dict], Any]:
    """Ask an HTTP model for every input of `p` through the window; (key -> fields of what came back,
    the window's stats). Runs its own event loop in a thread of its own (the caller may have one)."""
    out: dict[str, Any] = {}
    error: list[BaseException] = []

    def target() -> None:
        try:
            out["result"] = asyncio.run(_http_pass(gen, p, cache_url, api_key, concurrency, on_progress))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=target, name=f"synthtune-{p.what}-window")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out["result"]


async def _http_pass(gen: GenerateConfig, p: Pass, cache_url: str, api_key: SecretStr | None,
                     concurrency: int | None, on_progress) -> tuple[dict[str, dict], Any]:
    import aiohttp

    from synthtune import window

    k = concurrency or gen.concurrency
    log.info("%s: asking %s for %d answers the cache does not hold, %d in flight", p.what, p.model, len(p.inputs), k)
    task = make_task(gen, p, make_llm(gen, p))
    settings = generation_kwargs(gen.model_copy(update={"max_new_tokens": p.max_new_tokens or gen.max_new_tokens}))
    key = api_key or env_api_key(gen)
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    url = gen.base_url.rstrip("/") + "/chat/completions"
    cache = RowCache(f"{cache_url}/{p.cache}")
    writer = CacheWriter(cache, p.fields, gen.batch_size)
    found: dict[str, dict] = {}
    failures: dict[str, str] = {}
    tokens = {"prompt": 0, "completion": 0}  # the API's usage, summed over every reply
    writes: set[asyncio.Task] = set()

    def write(rows: list[dict] | None) -> None:
        if rows:
            t = asyncio.create_task(asyncio.to_thread(cache.write, rows))
            writes.add(t)
            t.add_done_callback(writes.discard)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=k, limit_per_host=k),
                                     timeout=aiohttp.ClientTimeout(total=gen.timeout_s)) as session:
        async def call(item: dict) -> dict:
            body = {"model": p.model, "messages": task.format_input(item), "max_tokens": settings["max_new_tokens"],
                    "temperature": settings["temperature"], "top_p": settings["top_p"]}
            try:
                async with session.post(url, json=body, headers=headers) as response:
                    if response.status >= 300:
                        raise _http_error(response.status, response.headers.get("Retry-After"),
                                          (await response.text())[:300])
                    reply = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError) as e:
                raise window.Retryable(f"{type(e).__name__}: {e}"[:300]) from None
            choices = reply.get("choices") or [{}]
            row = task.format_output((choices[0].get("message") or {}).get("content"), item)
            usage = reply.get("usage") or {}
            tokens["prompt"] += usage.get("prompt_tokens") or 0
            tokens["completion"] += usage.get("completion_tokens") or 0
            row.update(model_name=p.model, statistics={"input_tokens": usage.get("prompt_tokens"),
                                                       "output_tokens": usage.get("completion_tokens")})
            return row

        def on_done(index: int, row: dict) -> None:
            key_ = p.inputs[index]["id"]
            found[key_] = {f: row.get(f) for f in p.fields}
            if usable(row, p.required):  # an empty or unparsable reply stays out of the cache: asked again
                write(writer.add(key_, row))

        def on_fail(index: int, reason: str) -> None:
            failures[p.inputs[index]["id"]] = reason

        async def flusher() -> None:
            while True:
                await asyncio.sleep(FLUSH_S / 4)
                write(writer.flush_due())

        ticker = asyncio.create_task(flusher())
        try:
            stats = await window.drive(p.inputs, call, concurrency=k, max_retries=gen.max_retries, on_done=on_done,
                                       on_fail=on_fail, on_progress=on_progress,
                                       max_requests_per_s=gen.max_requests_per_s,
                                       max_tokens_per_min=gen.max_tokens_per_min,
                                       tokens_of=lambda item: len(str(item)) // 4 + settings["max_new_tokens"])
        finally:
            ticker.cancel()
            write(writer.take())
            if writes:
                await asyncio.gather(*writes)
    stats.failures, stats.tokens = failures, tokens
    return found, stats


def _http_error(status: int, retry_after: str | None, text: str) -> Exception:
    """An HTTP error status as what the window does with it."""
    from synthtune import window

    if status in window.THROTTLED:
        try:
            seconds = max(0.0, float(retry_after)) if retry_after is not None else None
        except ValueError:
            seconds = None
        return window.Throttled(f"HTTP {status}", seconds)
    if 400 <= status < 500 and status not in window.RETRYABLE:
        return window.Refused(f"HTTP {status}: {text}")
    return window.Retryable(f"HTTP {status}: {text}")


# ---------------------------------------------------------------- the passes a mode needs


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _first(values):
    return values[0] if isinstance(values, list | tuple) and len(values) else None


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


Executor = Callable[[Pass, "Tally"], dict[str, dict]]  # a pass's misses -> key -> fields of what came back


def cached_or_made(p: Pass, cache_url: str, execute: Executor, tally: Tally, ratings: bool = False) -> dict[str, dict]:
    """key -> entry for every input of `p`: from the row cache, else asked for now; counted in `tally`."""
    cache = RowCache(f"{cache_url}/{p.cache}")
    wanted = {i["id"] for i in p.inputs}
    hits = cache.lookup(wanted)
    misses = tuple({i["id"]: i for i in p.inputs if i["id"] not in hits}.values())
    fresh = execute(Pass(**{**vars(p), "inputs": misses}), tally) if misses else {}
    tally.of(p.what).cache_hits += len(hits)
    if not ratings:
        tally.fresh |= {k for k, v in fresh.items() if usable(v, p.required)}
    prefix = "ratings_" if ratings else ""
    setattr(tally, f"{prefix}reused", getattr(tally, f"{prefix}reused") + sum(i["id"] in hits for i in p.inputs))
    setattr(tally, f"{prefix}generated", getattr(tally, f"{prefix}generated") + sum(i["id"] in fresh for i in p.inputs))
    if hits:
        log.info("%s: %d reused from the row cache, %d asked for now", p.what, len(hits), len(misses))
    return {**hits, **fresh}


def answers_pass(gen: GenerateConfig, what: str, model: str, http: bool, requests: list[dict],
                 revision: str | None = None) -> Pass:
    return Pass(what=what, model=model, http=http, task="text_generation", cache="answers",
                fields=("generation", "model_name"), required=("generation",), inputs=tuple(requests),
                revision=revision)


def assemble(gen: GenerateConfig, seeds: list[dict], identities: dict[str, str], cache_url: str,
             execute: Executor, tally: Tally | None = None) -> tuple[list[dict], list[dict], Tally]:
    """(rows in seed order with provenance, quarantined rows with reasons, the tally: `tally`'s counts go on)."""
    tally = Tally() if tally is None else tally
    http = gen.teacher_kind == "openai"
    if gen.mode == "magpie":
        rows, dropped = _magpie(gen, identities["teacher"], cache_url, execute, tally)
        return rows, dropped, tally
    # one request per (seed, generation index), keyed by what determines the answer
    teacher = [(s, i, answer_key(gen, identities["teacher"], s["instruction"], i)) for s in seeds
               for i in range(gen.num_generations)]
    answers = cached_or_made(answers_pass(gen, "teacher", gen.teacher, http,
                                          [{"id": k, "instruction": s["instruction"]} for s, _, k in teacher],
                                          gen.teacher_revision), cache_url, execute, tally)
    candidates: dict[str, list[dict]] = {s["id"]: [] for s in seeds}  # per seed: {text, model, index, key}
    for s, i, k in teacher:
        candidates[s["id"]].append({"text": _text(answers.get(k, {}).get("generation")), "model": gen.teacher,
                                    "index": i, "key": k})
    if gen.mode == "preference" and gen.rejected_model:
        weaker = gen.model_copy(update={"teacher_kind": "transformers", "num_generations": 1})
        rejected = [(s, answer_key(weaker, identities["rejected"], s["instruction"], 0)) for s in seeds]
        found = cached_or_made(answers_pass(weaker, "rejected", gen.rejected_model, False,
                                            [{"id": k, "instruction": s["instruction"]} for s, k in rejected]),
                               cache_url, execute, tally)
        for s, k in rejected:
            candidates[s["id"]].append({"text": _text(found.get(k, {}).get("generation")), "model": gen.rejected_model,
                                        "index": len(candidates[s["id"]]), "key": k})
    dropped: list[dict] = []
    for seed_id, cands in candidates.items():
        for c in cands:
            if c["text"] is None:
                why = tally.failures.get(c["key"])
                dropped.append({"id": seed_id, "empty": why is None, "reason": (
                    f"{c['model']} gave up: {why}" if why else f"{c['model']} returned no text") +
                    f" (generation {c['index']})"})
        cands[:] = [c for c in cands if c["text"] is not None]
    by_id = {s["id"]: s for s in seeds}
    if gen.mode == "sft":
        rows = [{"id": i, "prompt": by_id[i]["instruction"], "response": c["text"], "teacher": gen.teacher,
                 "generation_index": c["index"], "seed_file": by_id[i]["seed_file"], "seed_line": by_id[i]["seed_line"]}
                for i, cands in candidates.items() for c in cands]
        tally.new_rows = sum(c["key"] in tally.fresh for cands in candidates.values() for c in cands)
        if gen.judge:  # each answer rated on its own
            rated = _ratings(gen, identities["judge"], [{"id": f"{r['id']}#{r['generation_index']}",
                                                         "instruction": r["prompt"], "generations": [r["response"]]}
                                                        for r in rows], cache_url, execute, tally)
            for r in rows:
                judged = rated[f"{r['id']}#{r['generation_index']}"]
                r.update(judge=gen.judge, rating=_first(judged.get("ratings")), rationale=_first(judged.get("rationales")))
    else:
        rows = _preference_pairs(gen, identities, by_id, candidates, cache_url, execute, dropped, tally)
    return rows, dropped, tally


def _ratings(gen: GenerateConfig, judge_id: str, items: list[dict], cache_url: str, execute: Executor,
             tally: Tally) -> dict[str, dict]:
    """UltraFeedback over items {id, instruction, generations}: id -> {ratings, rationales}."""
    keyed = [{"id": rating_key(gen, judge_id, i["instruction"], i["generations"]), "instruction": i["instruction"],
              "generations": i["generations"]} for i in items]
    p = Pass(what="judge", model=gen.judge, http=gen.teacher_kind == "openai", task="ultrafeedback", cache="ratings",
             fields=("ratings", "rationales", "model_name"), required=("ratings",), inputs=tuple(keyed),
             revision=gen.judge_revision, max_new_tokens=gen.judge_max_new_tokens)
    found = cached_or_made(p, cache_url, execute, tally, ratings=True)
    return {item["id"]: found.get(k["id"], {}) for item, k in zip(items, keyed, strict=True)}


def calibration_items(labels: list) -> tuple[list[dict], list[dict], list[dict]]:
    """What the judge rates to be calibrated: each labelled answer alone, and the first two answers of each
    prompt in both orders (synthtune.judging)."""
    from synthtune import judging

    both = judging.pairs(labels)
    singles = [{"id": f"label:{lab.line}", "instruction": lab.prompt, "generations": [lab.response]} for lab in labels]
    forward = [{"id": f"ab:{a.line}:{b.line}", "instruction": a.prompt, "generations": [a.response, b.response]}
               for a, b in both]
    backward = [{"id": f"ba:{a.line}:{b.line}", "instruction": a.prompt, "generations": [b.response, a.response]}
                for a, b in both]
    return singles, forward, backward


def uncached_ratings(gen: GenerateConfig, judge_id: str, items: list[dict], cache_url: str) -> int:
    """How many of `items` the judge would be asked to rate (the row cache holds the others)."""
    keys = {rating_key(gen, judge_id, i["instruction"], i["generations"]) for i in items}
    return len(keys) - len(RowCache(f"{cache_url}/ratings").lookup(keys))


def calibrate(gen: GenerateConfig, judge_id: str, labels: list, cache_url: str, execute: Executor,
              tally: Tally | None = None) -> dict:
    """The judge rates the calibration set (synthtune.judging): each labelled answer alone, and the first
    two answers of each prompt in both orders; its agreement with the labels and its position consistency.
    Ratings go through the row cache under the judge's identity, like any other."""
    from synthtune import judging

    tally = Tally() if tally is None else tally  # the stage's: the judge's calls are counted in its ledger
    asked, reused = tally.requests, tally.ratings_reused
    singles, forward, backward = calibration_items(labels)
    rated = _ratings(gen, judge_id, singles + forward + backward, cache_url, execute, tally)

    def first(item) -> float | None:
        ratings = rated[item["id"]].get("ratings") or []
        return ratings[0] if ratings and isinstance(ratings[0], int | float) else None

    verdicts = [None if (r := first(i)) is None else r >= gen.judge_accept_rating for i in singles]
    return {"file": str(gen.judge_calibration), "judge": gen.judge,
            **judging.agreement([lab.accept for lab in labels], verdicts),
            "position": judging.consistency([rated[i["id"]].get("ratings") for i in forward],
                                            [rated[i["id"]].get("ratings") for i in backward]),
            "requests": tally.requests - asked, "reused": tally.ratings_reused - reused}


def _preference_pairs(gen: GenerateConfig, identities: dict[str, str], seeds: dict[str, dict],
                      candidates: dict[str, list[dict]], cache_url: str, execute: Executor, dropped: list[dict],
                      tally: Tally) -> list[dict]:
    """chosen/rejected per seed: by the judge's ratings (best vs worst), else teacher vs rejected_model."""
    enough = {i: c for i, c in candidates.items() if len(c) >= 2}
    for i in candidates.keys() - enough.keys():
        dropped.append({"id": i, "reason": "fewer than two answers to compare"})
    if gen.judge:
        rated = _ratings(gen, identities["judge"], [{"id": i, "instruction": seeds[i]["instruction"],
                                                     "generations": [c["text"] for c in cands]}
                                                    for i, cands in enough.items()], cache_url, execute, tally)
    rows = []
    for i, cands in enough.items():
        where = {"seed_file": seeds[i]["seed_file"], "seed_line": seeds[i]["seed_line"]}
        if not gen.judge:
            chosen = next(c for c in cands if c["model"] == gen.teacher)
            rejected = next((c for c in cands if c["model"] == gen.rejected_model), None)
            if rejected is None:
                dropped.append({"id": i, "reason": f"{gen.rejected_model} gave no answer"})
                continue
            tally.new_rows += chosen["key"] in tally.fresh or rejected["key"] in tally.fresh
            rows.append({"id": i, "prompt": seeds[i]["instruction"], "chosen": chosen["text"],
                         "rejected": rejected["text"], "teacher": gen.teacher, "generation_index": chosen["index"],
                         "chosen_model": chosen["model"], "rejected_model": rejected["model"], **where})
            continue
        picked = pick_pair(cands, rated[i].get("ratings"), rated[i].get("rationales"))
        if isinstance(picked, str):
            dropped.append({"id": i, "reason": f"judge {gen.judge} {picked}"})
            continue
        (c, rating, rationale), (r, rejected_rating, rejected_rationale) = picked
        tally.new_rows += c["key"] in tally.fresh or r["key"] in tally.fresh
        rows.append({"id": i, "prompt": seeds[i]["instruction"], "chosen": c["text"], "rejected": r["text"],
                     "teacher": gen.teacher, "generation_index": c["index"], "chosen_model": c["model"],
                     "rejected_model": r["model"], "judge": gen.judge, "rating": rating,
                     "rejected_rating": rejected_rating, "rationale": rationale,
                     "rejected_rationale": rejected_rationale, **where})
    return rows


def _magpie(gen: GenerateConfig, teacher_id: str, cache_url: str, execute: Executor,
            tally: Tally) -> tuple[list[dict], list[dict]]:
    """Instructions and answers both from the teacher (Magpie): nothing but the chat template's
    user-turn opening is given, the model writes the instruction, then answers it."""
    keys = [magpie_key(gen, teacher_id, n) for n in range(gen.magpie_rows)]
    p = Pass(what="magpie", model=gen.teacher, http=False, task="magpie", cache="magpie",
             fields=("instruction", "response", "model_name"), required=("instruction", "response"),
             inputs=tuple({"id": k} for k in keys), revision=gen.teacher_revision)
    found = cached_or_made(p, cache_url, execute, tally)
    rows, dropped = [], []
    for n, k in enumerate(keys):
        r = found.get(k, {})
        instruction, response = _text(r.get("instruction")), _text(r.get("response"))
        if instruction is None or response is None:
            missing = "instruction" if instruction is None else "response"
            dropped.append({"id": f"magpie-{n}", "reason": f"{gen.teacher} wrote no {missing}", "empty": True})
            continue
        tally.new_rows += k in tally.fresh
        rows.append({"id": f"magpie-{n}", "prompt": instruction, "response": response, "teacher": gen.teacher,
                     "generation_index": 0, "seed_file": None, "seed_line": None})
    return rows, dropped


def too_many_failed(tally: Tally, asked: int, share: float) -> str | None:
    """Why the stage must fail instead of quarantining what the teacher never answered: more than
    `share` of this run's requests were given up (the teacher is down, not one prompt)."""
    if tally.failed and asked and tally.failed / asked > share:
        first = next(iter(tally.failures.values()))
        return (f"the teacher gave up on {tally.failed} of {asked} requests after retries (more than "
                f"generate.max_failed_share={share}); first: {first}. The finished answers are in the row cache: "
                "a retry asks only for the rest")
    return None


__all__ = ["GenerationError", "Pass", "Tally", "assemble", "http_pass", "make_llm", "make_task", "pick_pair"]


# ---------------------------------------------------------------- what a night would ask for (the budget)


def planned(gen: GenerateConfig, seeds: list[dict], identities: dict[str, str], cache_url: str,
            calibration: int = 0) -> dict:
    """What generate would send tonight, counted before anything is asked: the teacher's requests (the
    answers the row cache lacks, exactly), the judge's (one per new answer in sft mode, per seed with a
    new answer in preference mode, plus the `calibration` ratings not cached: an estimate, since a
    rating's key is the answers it rates), the seed files those requests come from, and an upper
    estimate of their tokens (prompt: ~4 bytes a token; completion: max_new_tokens each)."""
    from collections import Counter

    if gen.mode == "magpie":
        keys = [magpie_key(gen, identities["teacher"], n) for n in range(gen.magpie_rows)]
        hits = RowCache(f"{cache_url}/magpie").lookup(set(keys))
        new = [({"seed_file": "(magpie: no seed file)", "instruction": ""}, k) for k in keys if k not in hits]
    else:
        asked = [(s, answer_key(gen, identities["teacher"], s["instruction"], i)) for s in seeds
                 for i in range(gen.num_generations)]
        hits = RowCache(f"{cache_url}/answers").lookup({k for _, k in asked})
        new = [(s, k) for s, k in asked if k not in hits]
    judge = 0
    if gen.judge:
        judge = (len(new) if gen.mode == "sft" else len({s["id"] for s, _ in new})) + calibration
    system = len((gen.system_prompt or "").encode())
    prompt = sum((system + len(s["instruction"].encode())) // 4 + 8 for s, _ in new)
    completion = len(new) * gen.max_new_tokens
    judge_prompt = judge * (400 + (gen.num_generations + 1) * gen.max_new_tokens)
    return {"teacher": len(new), "judge": judge, "by_file": dict(Counter(s["seed_file"] for s, _ in new).most_common()),
            "tokens": {"teacher": (prompt, completion), "judge": (judge_prompt, judge * gen.judge_max_new_tokens)}}
