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
