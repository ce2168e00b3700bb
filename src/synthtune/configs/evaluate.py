"""evaluate's settings: lm-eval tasks and the flags that base, champion and tuned share."""

from __future__ import annotations

from typing import Literal

from synthtune.fields import InputDir, InputFile, Section, field

IN_DOMAIN = "in_domain"
FORGETTING = "forgetting"


class EvaluateConfig(Section):
    """lm-evaluation-harness settings, identical for the base model, the champion and tonight's candidate:
    the tasks (registry names or YAMLs in task_dir, their data hashed into the key), few-shot, chat
    template and system instruction, batch size, limit and seed."""

    tasks: list[str] = field(..., description="lm-eval task names: registry names or tasks defined in task_dir.",
                             min_length=1)
    task_dir: InputDir | None = field(None, "Folder of lm-eval task YAMLs; their data files are hashed into the key.")
    num_fewshot: int = field(0, "Few-shot examples per item, the same for base and tuned.", ge=0)
    apply_chat_template: bool = field(True, "Render prompts with the model's chat template (base and tuned alike).")
    fewshot_as_multiturn: bool = field(True, "With a chat template, give few-shot examples as earlier turns.")
    system_instruction: str | None = field(None, "System instruction put in front of every prompt (base and tuned).")
    in_domain: bool = field(
        False, f"Also run `{IN_DOMAIN}`, built from the rows the filter held out (filter.holdout_fraction): the teacher's reply "
        "scored by log-likelihood (acc: the student's greedy reply is the teacher's; perplexity).")
    allow_format_difference: bool = field(
        False, "Accept that lm-eval renders an eval task's items differently from how training renders the same "
        "conversation (a reasoning block on purpose, say): the difference is reported instead of stopping the run.",
        affects_output=False)
    slice_field: str | None = field(
        None, "Slices for the per-slice gate: the in-domain task's rows by this seed field (default: by seed file), "
        "and local tasks' items by this field where they carry it. Group subtasks are always slices.")
    forgetting: InputFile | None = field(
        None, f"A fixed general-text sample (paragraphs separated by blank lines; '#' lines skipped) scored as `{FORGETTING}`: "
        "mean token loss of base, champion and candidate, so forgetting shows on every verdict "
        "(promote.max_forgetting gates it). synthtune:general_text.txt is the sample synthtune ships.")
    backend: Literal["hf", "vllm"] = field(
        "hf", "lm-eval's model backend: `hf` (transformers, the adapter through PEFT) or `vllm` (vLLM with the adapter "
        "as a LoRA, `pip install 'synthtune[vllm]'`, a CUDA machine). Base, champion and candidate are always scored "
        "on the same backend: it is in the evaluate key, and the gate refuses to compare scores from two backends.")
    num_processes: int = field(
        1, "Score data-parallel on this many processes, one per GPU (on a CPU: gloo ranks): with `hf`, lm-eval "
        "under `accelerate launch`, each rank scoring a share of every task; with `vllm`, vLLM's data_parallel_size. "
        "The scores are those of one process, so it is in no cache key.", ge=1, affects_output=False)
    batch_size: int = field(16, "lm-eval batch size.", ge=1)
    limit: int | None = field(None, "Evaluate only the first N items of each task (None: all).", ge=1)
    seed: int = field(1234, "Seed passed to lm-eval (python, numpy, torch and few-shot sampling).")
