"""The generate stage's child process: the distilabel pipelines (teacher answers, a weaker model's
answers, judge ratings, Magpie), asked only for what the row cache does not hold.

Run by `synthtune.stages.generate` through `synthtune.child.call_in_child` in a spawned process:
distilabel forks workers, takes over the root logger and installs a SIGINT handler, and none of that
may touch the orchestrator.

Each answer is one distilabel input (one seed, one generation index) whose `id` is its row-cache
key, so the teacher receives exactly one request per missing answer, and the `SaveBatches` step
puts every finished batch into the cache as it goes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from pydantic import SecretStr

from synthtune.child import kill_survivors
from synthtune.configs import GenerateConfig
from synthtune.models import resolve
from synthtune.rowcache import RowCache
from synthtune.teacher import (
    GenerationError,
    answer_key,
    distilabel_guard,
    env_api_key,
    generation_kwargs,
    magpie_key,
    rating_key,
)

STAGE = "generate"
log = logging.getLogger("distilabel.synthtune")


@dataclass
class Tally:
    """Answers (and ratings) reused from the cache vs produced now, and rows holding a new answer."""

    reused: int = 0
    generated: int = 0
    ratings_reused: int = 0
    ratings_generated: int = 0
    new_rows: int = 0
    fresh: set[str] = field(default_factory=set)  # answer keys produced now

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "fresh"}


def _llm(gen: GenerateConfig, model: str, magpie: bool = False, max_new_tokens: int | None = None,
         revision: str | None = None):
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
    if magpie:  # the parent has resolved the template
        extra = {"use_magpie_template": True, "magpie_pre_query_template": gen.magpie_pre_query_template}
    return TransformersLLM(model=resolve(model), revision=revision or "main",
                           device="cuda" if torch.cuda.is_available() else None,
                           torch_dtype="auto", generation_kwargs=generation_kwargs(gen), **extra)


def _pass(gen: GenerateConfig, what: str, inputs: list[dict], cache: RowCache, cache_dir: str, make_task,
          fields: list[str], required: list[str], replicas: int = 1) -> dict[str, dict]:
    """One distilabel task over `inputs` (each `id` a row-cache key, unique), batch by batch; every
    finished batch goes into the cache. A batch whose step raised fails the pass once the rest
    finished (its inputs are not in the cache, so a retry asks for exactly those). Returns
    key -> fields of what this pass produced."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts, StepResources

    from synthtune.distil_steps import SaveBatches, step_failed

    if not inputs:
        return {}
    log.info("%s: asking for %d answers the cache does not hold", what, len(inputs))
    batch_size = gen.batch_size
    on_ray = gen.engine == "ray"
    with Pipeline(name=f"synthtune-{what}", cache_dir=cache_dir) as pipeline:
        load = LoadDataFromDicts(data=inputs, batch_size=batch_size)
        # on Ray each replica is an actor, placed on a node with the GPUs it asks for
        gpus = (gen.ray_gpus_per_replica or None) if on_ray else None
        task = make_task(resources=StepResources(replicas=replicas, gpus=gpus))
        save = SaveBatches(folder=cache.url, fields=fields, required=required, input_batch_size=batch_size)
        load >> task >> save
    if on_ray:  # the same DAG on the Ray cluster ray_session connected to
        pipeline = pipeline.ray()
    with distilabel_guard():
        distiset = pipeline.run(use_cache=False)
    rows = distiset["default"]["train"].to_list()
    failed = sorted({r["id"] for r in rows if step_failed(r)})
    if failed:
        raise GenerationError(
            f"{what}: the step raised for {len(failed)} of {len(inputs)} inputs; the {len(inputs) - len(failed)} "
            f"finished are in the row cache ({cache.url}) and a retry asks only for the rest. "
            "See the distilabel log for the step's error.")
    return {r["id"]: {f: r.get(f) for f in fields} for r in rows}


def _cached_or_made(what: str, inputs: list[dict], cache: RowCache, make, tally: Tally, field_: str) -> dict[str, dict]:
    """key -> entry for every input: from the cache, else from `make(misses)`; counted in `tally`."""
    hits = cache.lookup({i["id"] for i in inputs})
    misses = list({i["id"]: i for i in inputs if i["id"] not in hits}.values())
    fresh = make(misses)
    if not field_:
        tally.fresh |= fresh.keys()
    setattr(tally, f"{field_}reused", getattr(tally, f"{field_}reused") + sum(i["id"] in hits for i in inputs))
    setattr(tally, f"{field_}generated", getattr(tally, f"{field_}generated") + sum(i["id"] in fresh for i in inputs))
    if hits:
        log.info("%s: %d reused from the row cache, %d asked for now", what, len(hits), len(misses))
    return {**hits, **fresh}


def _answers(gen: GenerateConfig, model: str, requests: list[dict], what: str, cache_url: str, cache_dir: str,
             tally: Tally) -> dict[str, dict]:
    """key -> {generation, model_name} for requests {id (the key), instruction}."""
    from distilabel.steps.tasks import TextGeneration

    def make(misses: list[dict]) -> dict[str, dict]:
        if not misses:
            return {}
        import torch

        torch.manual_seed(gen.seed)
        llm = _llm(gen, model, revision=gen.teacher_revision if model == gen.teacher else None)
        return _pass(gen, what, misses, cache, cache_dir,
                     lambda **kw: TextGeneration(llm=llm, system_prompt=gen.system_prompt, num_generations=1,
                                                 input_batch_size=gen.batch_size, add_raw_output=False,
                                                 add_raw_input=False, **kw),
                     ["generation", "model_name"], ["generation"], gen.concurrency)

    cache = RowCache(f"{cache_url}/answers")
    return _cached_or_made(what, requests, cache, make, tally, "")


def _ratings(gen: GenerateConfig, judge_id: str, items: list[dict], cache_url: str, cache_dir: str,
             tally: Tally) -> dict[str, dict]:
    """UltraFeedback over items {id, instruction, generations}: id -> {ratings, rationales}."""
    from distilabel.steps.tasks import UltraFeedback

    keyed = [{"id": rating_key(gen, judge_id, i["instruction"], i["generations"]), "instruction": i["instruction"],
              "generations": i["generations"]} for i in items]

    def make(misses: list[dict]) -> dict[str, dict]:
        if not misses:
            return {}
        llm = _llm(gen, gen.judge, max_new_tokens=gen.judge_max_new_tokens, revision=gen.judge_revision)
        return _pass(gen, "judge", misses, cache, cache_dir,
                     lambda **kw: UltraFeedback(llm=llm, aspect=gen.judge_aspect, input_batch_size=gen.batch_size,
                                                add_raw_output=False, add_raw_input=False, **kw),
                     ["ratings", "rationales", "model_name"], ["ratings"], gen.concurrency)

    cache = RowCache(f"{cache_url}/ratings")
    found = _cached_or_made("judge", keyed, cache, make, tally, "ratings_")
    return {item["id"]: found.get(k["id"], {}) for item, k in zip(items, keyed, strict=True)}


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def run_distilabel(gen: GenerateConfig, seeds: list[dict], identities: dict[str, str], cache_url: str, cache_dir: str,
                   api_key: SecretStr | None = None) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(rows in seed order with provenance, quarantined rows with reasons, counts)."""
    if api_key is not None:  # this child's environment only: it ends with the child
        os.environ[gen.api_key_env] = api_key.get_secret_value()
    with ray_session(gen):
        return _run(gen, seeds, identities, cache_url, cache_dir)


# what Ray workers need from this process's environment (offline mode, no telemetry, tokenizers)
RAY_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK",
           "TOKENIZERS_PARALLELISM", "HF_HOME", "HF_HUB_CACHE", "SYNTHTUNE_CACHE", "OPENAI_API_KEY")


@contextlib.contextmanager
def ray_session(gen: GenerateConfig):
    """generate.engine=ray: connect to `generate.ray_address` (ray://head:10001, or `auto` on a cluster
    node), or start a local Ray cluster for this child, and shut it down after (this child exits
    without running atexit hooks, which would otherwise be what stops a local cluster)."""
    if gen.engine != "ray":
        yield
        return
    import ray

    env = {k: os.environ[k] for k in (*RAY_ENV, gen.api_key_env) if k in os.environ}
    kwargs: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "ignore_reinit_error": True}
    if not gen.ray_address:  # a local cluster sized to this machine, without the dashboard
        kwargs.update(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 << 20)
    ray.init(address=gen.ray_address or None, **kwargs)
    log.info("generate on Ray: %s, resources %s", gen.ray_address or "a local cluster", ray.cluster_resources())
    try:
        yield
    finally:
        import psutil

        started = psutil.Process().children(recursive=True)  # raylet, GCS, the actors' workers
        ray.shutdown()
        kill_survivors(started, grace=10)  # workers orphaned by the raylet's exit: nothing outlives the run


def _run(gen: GenerateConfig, seeds: list[dict], identities: dict[str, str], cache_url: str,
         cache_dir: str) -> tuple[list[dict], list[dict], dict[str, int]]:
    tally = Tally()
    if gen.mode == "magpie":
        rows, dropped = _magpie(gen, identities["teacher"], cache_url, cache_dir, tally)
        return rows, dropped, tally.counts()
    # one request per (seed, generation index), keyed by what determines the answer
    teacher = [(s, i, answer_key(gen, identities["teacher"], s["instruction"], i)) for s in seeds
               for i in range(gen.num_generations)]
    answers = _answers(gen, gen.teacher, [{"id": k, "instruction": s["instruction"]} for s, _, k in teacher],
                       "teacher", cache_url, cache_dir, tally)
    candidates: dict[str, list[dict]] = {s["id"]: [] for s in seeds}  # per seed: {text, model, index, key}
    for s, i, k in teacher:
        candidates[s["id"]].append({"text": _text(answers.get(k, {}).get("generation")), "model": gen.teacher,
                                    "index": i, "key": k})
    if gen.mode == "preference" and gen.rejected_model:
        weaker = gen.model_copy(update={"teacher_kind": "transformers", "num_generations": 1})
        rejected = [(s, answer_key(weaker, identities["rejected"], s["instruction"], 0)) for s in seeds]
        found = _answers(weaker, gen.rejected_model, [{"id": k, "instruction": s["instruction"]} for s, k in rejected],
                         "rejected", cache_url, cache_dir, tally)
        for s, k in rejected:
            candidates[s["id"]].append({"text": _text(found.get(k, {}).get("generation")), "model": gen.rejected_model,
                                        "index": len(candidates[s["id"]]), "key": k})
    dropped: list[dict] = []
    for seed_id, cands in candidates.items():
        for c in cands:
            if c["text"] is None:
                dropped.append({"id": seed_id, "reason": f"{c['model']} returned no text (generation {c['index']})",
                                "empty": True})
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
                                                        for r in rows], cache_url, cache_dir, tally)
            for r in rows:
                judged = rated[f"{r['id']}#{r['generation_index']}"]
                r.update(judge=gen.judge, rating=_first(judged.get("ratings")), rationale=_first(judged.get("rationales")))
    else:
        rows = _preference_pairs(gen, identities, by_id, candidates, cache_url, cache_dir, dropped, tally)
    return rows, dropped, tally.counts()


def _first(values):
    return values[0] if isinstance(values, list | tuple) and len(values) else None


def _preference_pairs(gen: GenerateConfig, identities: dict[str, str], seeds: dict[str, dict],
                      candidates: dict[str, list[dict]], cache_url: str, cache_dir: str, dropped: list[dict],
                      tally: Tally) -> list[dict]:
    """chosen/rejected per seed: by the judge's ratings (best vs worst), else teacher vs rejected_model."""
    enough = {i: c for i, c in candidates.items() if len(c) >= 2}
    for i in candidates.keys() - enough.keys():
        dropped.append({"id": i, "reason": "fewer than two answers to compare"})
    if gen.judge:
        rated = _ratings(gen, identities["judge"], [{"id": i, "instruction": seeds[i]["instruction"],
                                                     "generations": [c["text"] for c in cands]}
                                                    for i, cands in enough.items()], cache_url, cache_dir, tally)
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


def _magpie(gen: GenerateConfig, teacher_id: str, cache_url: str, cache_dir: str,
            tally: Tally) -> tuple[list[dict], list[dict]]:
    """Instructions and answers both from the teacher (Magpie): nothing but the chat template's
    user-turn opening is given, the model writes the instruction, then answers it."""
    from distilabel.steps.tasks import Magpie

    system = {"system_prompt": gen.system_prompt} if gen.system_prompt else {}

    def make(misses: list[dict]) -> dict[str, dict]:
        if not misses:
            return {}
        import torch

        torch.manual_seed(gen.seed)
        llm = _llm(gen, gen.teacher, magpie=True, revision=gen.teacher_revision)
        return _pass(gen, "magpie", misses, cache, cache_dir,
                     lambda **kw: Magpie(llm=llm, n_turns=1, input_batch_size=gen.batch_size, **system, **kw),
                     ["instruction", "response", "model_name"], ["instruction", "response"])

    cache = RowCache(f"{cache_url}/magpie")
    keys = [magpie_key(gen, teacher_id, n) for n in range(gen.magpie_rows)]
    found = _cached_or_made("magpie", [{"id": k} for k in keys], cache, make, tally, "")
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
