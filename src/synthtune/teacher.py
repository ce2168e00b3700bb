"""What the generate stage, synthtune.generation and the stage's child process share about talking to
a teacher: the generation settings sent, the row-cache key of each answer and rating, and the API key.
Kept out of the stage module so the child never imports the stage (no import cycle)."""

from __future__ import annotations

import os

from pydantic import SecretStr

from synthtune.configs import GenerateConfig
from synthtune.rowcache import entry_key


class GenerationError(RuntimeError):
    pass


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


def env_api_key(gen: GenerateConfig) -> SecretStr | None:
    value = os.environ.get(gen.api_key_env)
    return SecretStr(value) if value else None


def endpoint_problems(gen: GenerateConfig, api_key: SecretStr | None = None, timeout: float = 5.0) -> list[str]:
    """One `GET {base_url}/models`, no retries: an endpoint that is down, refuses the key or does not
    serve the teacher (or judge) is an error within seconds, naming the field, before any run starts
    (generation itself retries for minutes). Nothing for a local teacher."""
    import json
    import urllib.error
    import urllib.request

    if gen.teacher_kind != "openai" or not gen.base_url:
        return []
    base = gen.base_url.rstrip("/")
    api_key = api_key or env_api_key(gen)
    if api_key is None and gen.api_key_secret:  # the Secret block is read by the Prefect task only: never ask
        return []                               # without the key (generate checks the endpoint with it)
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/models", headers=headers), timeout=timeout) as r:
            listed = json.loads(r.read() or b"{}").get("data") or []
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return [f"generate.base_url: {base} refused the API key (HTTP {e.code} {e.reason}): set "
                    f"${gen.api_key_env}" + (" (or generate.api_key_secret)" if not gen.api_key_secret else "")]
        return [f"generate.base_url: {base}/models answered HTTP {e.code} {e.reason}: is this an OpenAI-compatible "
                "endpoint (the URL usually ends in /v1)?"]
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        return [f"generate.base_url: {base} is not answering ({type(e).__name__}: {why}); is the server up and the URL "
                "right (it usually ends in /v1)?"]
    served = [m.get("id") for m in listed if isinstance(m, dict) and m.get("id")]
    return [f"generate.{role}: '{model}' is not served at generate.base_url {base} (it serves: "
            f"{', '.join(served[:5])}{' ...' if len(served) > 5 else ''})"
            for role, model in (("teacher", gen.teacher), ("judge", gen.judge)) if model and served and model not in served]
