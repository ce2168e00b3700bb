"""The model card: `README.md` beside the adapter, as the Hugging Face Hub reads it (YAML metadata
first) and as a person needs it to trust and reproduce the adapter.

train writes it (base model, data keys, training, serving checks, the command and the resolved
config); promote completes it with the evaluation table and the verdict (`ArtifactStore.annotate`),
since the scores exist only after training.
"""

from __future__ import annotations

import os
import re

import yaml

PENDING = "_Not evaluated yet: synthtune writes the table here when the candidate is judged (promote)._"


def render(meta: dict, title: str, sections: dict[str, str]) -> str:
    body = "\n\n".join(f"## {name}\n\n{text.strip()}" for name, text in sections.items())
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n{body}\n"


def parse(text: str) -> tuple[dict, str, dict[str, str]]:
    """(metadata, title, sections) of a card `render` wrote."""
    _, front, rest = text.split("---\n", 2)
    title = re.search(r"^# (.+)$", rest, re.M).group(1)
    parts = re.split(r"^## (.+)$", rest, flags=re.M)
    return yaml.safe_load(front), title, {parts[i].strip(): parts[i + 1].strip() for i in range(1, len(parts), 2)}


def command() -> str:
    """What started this run: the CLI's command line, or the Prefect deployment run."""
    return os.environ.get("SYNTHTUNE_COMMAND") or "synthtune (library call)"


def lineage_section(chain: list[dict]) -> str:
    """The adapters behind this one, newest first, back to the one trained from base."""
    lines = []
    for link in chain:
        if link.get("gone"):
            lines.append(f"- `{link['key']}`: removed (gc); the chain goes on beyond it")
            continue
        rows = link.get("rows") or {}
        continued = link.get("init", "base") != "base"
        what = f"{rows.get('trained', rows.get('train'))} rows" + (
            f" ({rows['new']} new, {rows['replay']} replayed)" if continued and "new" in rows else "")
        origin = f"continues `{link['init']}`" if continued else "trained from base"
        lines.append(f"- `{link['key']}` ({link.get('created_at')}): {origin}, on {what}")
    return "\n".join(lines) + "\n"


def train_card(cfg, train_key: str, data_keys: dict[str, str], metrics: dict, config_yaml: str,
               chain: list[dict] | None = None) -> str:
    tc = cfg.train
    meta = {
        "base_model": cfg.student,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["synthtune", "lora", "trl", tc.mode, *(["qlora"] if metrics.get("quantization") == "nf4" else [])],
        "datasets": [f"synthtune:{stage}/{key}" for stage, key in data_keys.items()],
    }
    training = (
        f"- mode: {tc.mode}, LoRA r={tc.lora.r}, alpha={tc.lora.alpha}, target modules: {tc.lora.target_modules}\n"
        f"- {metrics.get('steps')} steps, loss {metrics.get('first_loss')} -> {metrics.get('last_loss')}, "
        f"{metrics.get('tokens_per_s')} tokens/s on {metrics.get('device')} "
        f"(quantization {metrics.get('quantization')}, micro-batch {metrics.get('micro_batch')} x "
        f"{metrics.get('gradient_accumulation_steps')})\n"
        f"- train key `{train_key}`; data: " + ", ".join(f"{s} `{k}`" for s, k in data_keys.items())
        + (f"\n- starts {metrics['start']}" if metrics.get("start") else ""))
    reproduce = (f"Produced by `{command()}`. The resolved config (save it as `pipeline.yaml`, then "
                 f"`synthtune run pipeline.yaml`):\n\n```yaml\n{config_yaml}```")
    return render(meta, f"{cfg.name}: {tc.mode} LoRA adapter for {cfg.student}", {
        "Training": training, **({"Lineage": lineage_section(chain)} if chain else {}),
        "Serving checks": serving_checks(metrics.get("serving") or {}), "Evaluation": PENDING,
        "Reproduce": reproduce})


def serving_checks(serving: dict) -> str:
    """The card's serving section: what a LoRA server will make of the adapter, and the merged export."""
    problems = [p for part in ("adapter", "stops") for p in (serving.get(part) or {}).get("problems", [])]
    parity = serving.get("merge_parity")
    adapter = serving.get("adapter") or {}
    stops = serving.get("stops") or {}
    return (
        f"- LoRA tensors only: {adapter.get('lora_only')}; modules: {', '.join(adapter.get('modules', []))}; "
        f"added tokens: {adapter.get('added_tokens')}\n"
        f"- chat template saved: {stops.get('chat_template')}; a reply ends with `{stops.get('end_of_turn')}`, "
        f"which stops generation: {stops.get('stops')}\n"
        + (f"- merged export: greedy tokens identical to the adapter's on {parity['identical']} held prompts\n"
           if parity else "- no merged export (train.merge off)\n")
        + ("".join(f"- **{p}**\n" for p in problems) if problems else "- ready for a LoRA server (e.g. vLLM "
                                                                       "`--enable-lora`)\n"))


def with_serving(card: str, serving: dict) -> str:
    """The card with its serving section rendered again (a merged export added after training)."""
    meta, title, sections = parse(card)
    sections["Serving checks"] = serving_checks(serving)
    return render(meta, title, sections)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def with_evaluation(card: str, name: str, rows: list[dict], promoted: bool, reasons: list[str]) -> str:
    """The card with its Evaluation section (base, champion, tuned per task and metric) and the Hub's
    `model-index` metadata filled in."""
    meta, title, sections = parse(card)
    champion = any(r.get("champion") is not None for r in rows)
    head = "| task | metric | base |" + (" champion |" if champion else "") + " tuned | delta |\n"
    head += "|---|---|---|" + ("---|" if champion else "") + "---|---|\n"
    lines = [f"| {r['task']} | {r['metric']} | {_fmt(r.get('base'))} |"
             + (f" {_fmt(r.get('champion'))} |" if champion else "")
             + f" {_fmt(r.get('tuned'))} | {_fmt(r.get('delta'))} |" for r in rows]
    verdict = ("**Promoted** to champion." if promoted else "**Not promoted**.") + "\n\n" + "\n".join(
        f"- {r}" for r in reasons)
    sections["Evaluation"] = ("Scored with lm-evaluation-harness, base and tuned under identical flags "
                              "(multiple choice by log-likelihood).\n\n" + head + "\n".join(lines) + "\n\n" + verdict)
    tasks: dict[str, list] = {}
    for r in rows:
        if isinstance(r.get("tuned"), (int, float)):
            tasks.setdefault(r["task"], []).append({"type": r["metric"], "name": r["metric"], "value": r["tuned"]})
    meta["model-index"] = [{"name": name, "results": [
        {"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task}, "metrics": metrics}
        for task, metrics in tasks.items()]}]
    return render(meta, title, sections)
