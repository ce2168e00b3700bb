"""One rendering for training, evaluation and serving, and the check that they agree.

The template stage renders rows with the student's chat template (or `template.chat_template`);
lm-eval renders its prompts with `tokenizer.apply_chat_template`; a server renders with the template
saved next to the adapter. Three renderings of one template can still differ:

- template variables: Qwen3's `enable_thinking`, a Llama 3.x "Today Date" header read from the clock.
  `template.chat_template_kwargs` and `template.date_string` become defaults written into the template
  itself (`pinned`), so every renderer gets them, a request may still override them, and a row renders
  the same on every day;
- a template that refuses a system role: training folds the system prompt into the first user turn,
  lm-eval drops it with a warning. The evaluation and serving template fold it the same way (`fold`);
- a task's `target_delimiter` against the text the template puts before a reply (Mistral's space):
  only the task can say, so `check` renders each local eval task's first items with lm-eval's own
  request builder and compares them, string and tokens, with how training renders the same
  conversation. A difference is an error naming the task, unless `evaluate.allow_format_difference`
  acknowledges it (it is then reported). The in-domain task is ours: its delimiter is the template's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synthtune.chat import ChatEncoder
    from synthtune.configs import PipelineConfig, TemplateConfig

__all__ = ["FormatError", "Finding", "chat_template_args", "check", "encoder", "eval_template", "pinned",
           "template_variables"]

# The system turn folded into the first user turn exactly as synthtune.chat._fold_system does it.
FOLD = ("{%- if messages and messages[0]['role'] == 'system' and messages|length > 1 and messages[1]['role'] == 'user' %}"
        "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}]"
        " + messages[2:] %}{%- endif %}")
PROBE = ("What is the capital of Vardon?", "The capital of Vardon is Quellis.")


class FormatError(ValueError):
    """Evaluation would score a format training never saw."""


def reads_date(template: str) -> bool:
    return bool(re.search(r"\bstrftime_now\b|\bdate_string\b", template))


def template_variables(tc: TemplateConfig, template: str) -> dict[str, Any]:
    """The variables every rendering of `template` gets: template.chat_template_kwargs, and
    template.date_string where the template prints a date."""
    out = dict(tc.chat_template_kwargs)
    if reads_date(template):
        out.setdefault("date_string", tc.date_string)
    return out


def _literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def pinned(template: str, variables: dict[str, Any]) -> str:
    """`template` with `variables` as defaults: set unless the caller passes them."""
    for name in variables:
        if not name.isidentifier():
            raise ValueError(f"template.chat_template_kwargs: '{name}' is not a template variable name")
    return "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {_literal(v)} %}}{{%- endif %}}"
                   for k, v in sorted(variables.items())) + template


def eval_template(enc: ChatEncoder) -> str:
    """The template evaluation and serving use: the training template (its variables already pinned by
    `encoder`) and, where it refuses a system role, the system prompt folded into the first user turn as
    training folds it."""
    return (FOLD if not enc.supports_system() else "") + enc.template


def encoder(cfg: PipelineConfig, tokenizer) -> ChatEncoder:
    """The template stage's encoder: template.chat_template (or the tokenizer's) with its variables
    pinned, and template.system_prompt."""
    from synthtune.chat import ChatEncoder

    tc = cfg.template
    raw = tc.chat_template.read_text() if tc.chat_template else tokenizer.chat_template
    return ChatEncoder(tokenizer, pinned(raw, template_variables(tc, raw)) if raw else None, tc.system_prompt)


def chat_template_args(cfg: PipelineConfig, tokenizer) -> dict[str, str]:
    """lm-eval's `chat_template_args` (passed to every apply_chat_template): the evaluation template
    when it is not the tokenizer's own, else nothing."""
    text = eval_template(encoder(cfg, tokenizer))
    return {} if text == tokenizer.chat_template else {"chat_template": text}


def serving_check(cfg: PipelineConfig, saved, tokenizer) -> dict:
    """The template saved with the adapter (`saved`, the tokenizer a server loads) renders a probe
    conversation, the system prompt included, exactly as the template stage trained it."""
    user, reply = PROBE
    conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    system = [{"role": "system", "content": cfg.template.system_prompt}] if cfg.template.system_prompt else []
    trained = encoder(cfg, tokenizer).layout(conversation, "probe").text
    try:
        served = saved.apply_chat_template(system + conversation, tokenize=False)
    except Exception as e:  # jinja's raise_exception: the saved template refuses this conversation
        served = f"<refused: {e}>"
    if served == trained:
        return {"same_as_training": True, "problems": []}
    had, renders, _ = _quote(trained, served)
    return {"same_as_training": False, "problems": [
        f"the chat template saved with the adapter renders {renders!r} where training had {had!r}: a server "
        "would prompt the model in a format it was not trained on"]}


def first_difference(a, b) -> int:
    """Where two sequences (texts or token lists) first differ: the length of the shorter when one is
    the other's start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _quote(a: str, b: str) -> tuple[str, str, int]:
    """Both texts around their first difference, and where it is."""
    at = first_difference(a, b)
    return a[max(0, at - 24):at + 24], b[max(0, at - 24):at + 24], at


@dataclass
class Finding:
    task: str
    item: str
    train: str
    eval: str
    detail: str

    def __str__(self) -> str:
        return f"{self.task} (item {self.item}): {self.detail}"


def _around(tokenizer, a: str, b: str) -> str:
    """The two texts token by token around their first difference."""
    ta = tokenizer.convert_ids_to_tokens(tokenizer(a, add_special_tokens=False)["input_ids"])
    tb = tokenizer.convert_ids_to_tokens(tokenizer(b, add_special_tokens=False)["input_ids"])
    at = first_difference(ta, tb)
    lo = max(0, at - 3)
    return f"from token {at}: trained {ta[lo:at + 4]} vs evaluated {tb[lo:at + 4]}"


def _compare(enc: ChatEncoder, task: str, item: str, user: str, reply: str, scored: str) -> Finding | None:
    """None when lm-eval's scored text (context + continuation) is what training renders for the
    conversation up to the end of the reply; else what differs."""
    from synthtune.chat import RowError, TemplateError

    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    try:
        lay = enc.layout(messages, item)  # the system prompt added (or folded) as the template stage does
        full, (start, _) = lay.text, lay.turns[-1]
    except (RowError, TemplateError) as e:
        return Finding(task, item, "", scored, f"training cannot render this item: {e}")
    trained = full[:start + len(reply)]  # up to the end of the reply's content, as lm-eval scores it
    if trained == scored:
        return None
    has, scores, at = _quote(trained, scored)
    return Finding(task, item, trained, scored, f"lm-eval scores {scores!r} where training has {has!r} (character "
                                                f"{at}); {_around(enc.tok, trained, scored)}")


def reply_delimiter(enc: ChatEncoder, template: str) -> str | None:
    """The text the template puts between the generation prompt and a reply's content (the in-domain
    task's target_delimiter), or None when training's rendering does not begin with the generation prompt."""
    user, reply = PROBE
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    prompt = enc.tok.apply_chat_template(messages[:-1], chat_template=template, tokenize=False, add_generation_prompt=True)
    lay = enc.layout(messages, "probe")
    full, (start, _) = lay.text, lay.turns[-1]
    return full[len(prompt):start] if full[:start].startswith(prompt) else None


def check(cfg: PipelineConfig, enc: ChatEncoder, template: str, task_dir: Path | None, limit: int = 3) -> list[Finding]:
    """Render the first `limit` items of every local eval task (and the in-domain task) with
    lm-eval's request builder, the evaluation's flags and `template`, and compare each with how
    training renders the same conversation."""
    import tempfile

    from lm_eval.tasks import TaskManager, get_task_dict

    from synthtune.configs import IN_DOMAIN
    from synthtune.eval_tasks import in_domain_task, local_tasks, portable_task_dir

    ec = cfg.evaluate
    names = [t for t in ec.tasks if t in local_tasks(ec.task_dir)]
    findings: list[Finding] = []

    # lm-eval's own HF rendering (its fallback included: a refused system turn is dropped), with the
    # chat_template_args evaluate passes
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    model = SimpleNamespace(tokenizer=enc.tok, chat_template_args={"chat_template": template})

    def chat(history: list[dict], add_generation_prompt: bool = True) -> str:
        return HFLM.apply_chat_template(model, history, add_generation_prompt)

    lead = reply_delimiter(enc, template) or ""
    with tempfile.TemporaryDirectory(prefix="synthtune-parity-") as tmp:
        folder = portable_task_dir(ec.task_dir, Path(tmp) / "tasks") or Path(tmp) / "tasks"
        if ec.in_domain:  # written as evaluate writes it, from one probe row
            import pandas as pd

            in_domain_task(pd.DataFrame([{"id": "probe", "prompt": PROBE[0], "response": PROBE[1]}]),
                           folder / "synthtune_in_domain", lead)
            names.append(IN_DOMAIN)
        if not names:
            return findings
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        for name, task in _leaves(get_task_dict(names, manager)):
            task.set_config("num_fewshot", 0)
            task.build_all_requests(limit=limit, rank=0, world_size=1, apply_chat_template=ec.apply_chat_template,
                                    fewshot_as_multiturn=False, system_instruction=ec.system_instruction,
                                    chat_template=chat, tokenizer_name="synthtune-parity")
            seen = set()
            for inst in task.instances:
                if inst.doc_id in seen or inst.request_type not in ("loglikelihood", "multiple_choice"):
                    continue
                seen.add(inst.doc_id)
                context, continuation = inst.arguments[0], inst.arguments[1]
                # the reply training would see: the scored continuation without what the template adds before it
                reply = continuation[len(lead):] if lead and continuation.startswith(lead) else continuation
                user = task.doc_to_text(inst.doc)
                item = str(inst.doc.get("id", inst.doc_id)) if isinstance(inst.doc, dict) else str(inst.doc_id)
                if found := _compare(enc, name, item, str(user), str(reply), context + continuation):
                    if lead and not continuation.startswith(lead):
                        found.detail += (f". The template puts {lead!r} before a reply, and lm-eval drops "
                                         "target_delimiter under a chat template: start each choice (target) with it")
                    findings.append(found)
    return findings


def _leaves(task_dict: dict):
    for name, task in task_dict.items():
        if isinstance(task, dict):
            yield from _leaves(task)
        else:
            yield getattr(name, "group_name", None) or getattr(task, "task_name", None) or str(name), task
