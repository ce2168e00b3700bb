"""The generate stage's child processes: a local model's passes, and the Ray replicas.

`local_pass` drives distilabel's task over a local transformers model batch by batch (`batch_size`
inputs a generate() call), each batch written to the row cache as it finishes. It runs in a spawned
process (`synthtune.child.call_in_child`): a model's memory, torch's thread pools and whatever the
libraries do to logging end with it.

`ray_pass` splits a pass's inputs between `replicas` Ray actors, each working on its share: an HTTP
window of its own (synthtune.generation.http_pass) or a local model (`local_pass`); every request is
asked once, by one replica. It connects to `generate.ray_address` or starts a local cluster, and shuts
it down after (nothing outlives the run).
"""

from __future__ import annotations

import logging

from pydantic import SecretStr

from synthtune.configs import GenerateConfig
from synthtune.generation import Pass, http_pass, make_llm, make_task, row_tokens, usable
from synthtune.raycluster import ray_session
from synthtune.rowcache import RowCache

STAGE = "generate"
log = logging.getLogger("distilabel.synthtune")


def local_pass(gen: GenerateConfig, p: Pass, cache_url: str) -> tuple[dict[str, dict], dict]:
    """Every input of `p` through a local model, batch by batch; (key -> fields, counts: tokens as the
    model's tokenizer counts them)."""
    import torch

    torch.manual_seed(gen.seed)
    log.info("%s: asking %s for %d answers the cache does not hold", p.what, p.model, len(p.inputs))
    task = make_task(gen, p, make_llm(gen, p))
    cache = RowCache(f"{cache_url}/{p.cache}")
    found: dict[str, dict] = {}
    tokens = {"prompt": 0, "completion": 0}
    for start in range(0, len(p.inputs), gen.batch_size):
        rows = next(task.process([dict(i) for i in p.inputs[start:start + gen.batch_size]]))
        cache.write([{"key": r["id"], **{f: r.get(f) for f in p.fields}} for r in rows if usable(r, p.required)])
        found.update({r["id"]: {f: r.get(f) for f in p.fields} for r in rows})
        for r in rows:
            prompt, completion = row_tokens(r)
            tokens["prompt"] += prompt
            tokens["completion"] += completion
    return found, {"failed": 0, "retries": 0, "failures": {}, "sent": len(p.inputs), "tokens": tokens}


class Replica:
    """One teacher replica (a Ray actor): the passes of its share of the inputs."""

    def run(self, gen: GenerateConfig, p: Pass, cache_url: str, api_key: SecretStr | None) -> tuple[dict, dict]:
        if p.http:
            found, stats = http_pass(gen, p, cache_url, api_key)
            return found, {"failed": stats.failed, "retries": stats.retries, "failures": stats.failures,
                           "sent": len(p.inputs) + stats.retries, "tokens": stats.tokens}
        return local_pass(gen, p, cache_url)


def ray_pass(gen: GenerateConfig, p: Pass, cache_url: str, api_key: SecretStr | None = None) -> tuple[dict, dict]:
    """`p`'s inputs split round-robin between `replicas` actors; their answers merged."""
    with ray_session(gen.ray_address, "generate") as ray:
        replicas = max(1, min(gen.replicas, len(p.inputs)))
        actor = ray.remote(num_cpus=1, num_gpus=gen.ray_gpus_per_replica or 0)(Replica)
        actors = [actor.remote() for _ in range(replicas)]
        shares = [Pass(**{**vars(p), "inputs": p.inputs[n::replicas]}) for n in range(replicas)]
        log.info("%s: %d requests split between %d replicas", p.what, len(p.inputs), replicas)
        results = ray.get([a.run.remote(gen, share, cache_url, api_key) for a, share in zip(actors, shares,
                                                                                               strict=True)])
    found: dict = {}
    stats = {"failed": 0, "retries": 0, "failures": {}, "per_replica": [], "sent": 0, "tokens": {"prompt": 0, "completion": 0}}
    for share, (part, counts) in zip(shares, results, strict=True):
        found.update(part)
        for name in ("failed", "retries", "sent"):
            stats[name] += counts.get(name, 0)
        for name in ("prompt", "completion"):
            stats["tokens"][name] += counts.get("tokens", {}).get(name, 0)
        stats["failures"].update(counts.get("failures", {}))
        stats["per_replica"].append(len(share.inputs))
    return found, stats
