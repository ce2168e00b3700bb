"""train's settings: LoRA / QLoRA with TRL, SFT or DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from synthtune.fields import Section, field


class LoraParams(Section):
    """The LoRA adapter's shape: rank, alpha, dropout, target modules, DoRA and rsLoRA."""

    r: int = field(16, "LoRA rank.", ge=1, le=1024)
    alpha: int = field(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).", ge=1)
    dropout: float = field(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    target_modules: str | list[str] = field(
        "all-linear", "Modules to adapt: `all-linear` or a list of module names such as [q_proj, v_proj]."
    )
    use_dora: bool = field(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = field(False, "Rank-stabilised scaling alpha / sqrt(r).")


class TrainConfig(Section):
    """LoRA / QLoRA fine-tuning with TRL: SFT or DPO, quantization (by what it resolves to on the
    machine), the optimizer schedule, batch and memory plan, checkpoints, and the merged export."""

    mode: Literal["sft", "dpo"] = field("sft", "`sft` on conversations, or `dpo` on chosen/rejected pairs.")
    quantization: Literal["auto", "nf4", "none"] = field(
        "auto", "`nf4`: QLoRA (4-bit NF4 base). `none`: LoRA on a full-precision base. `auto`: nf4 when CUDA is present.",
        resolved=True)
    lora: LoraParams = field(default_factory=LoraParams, description="LoRA adapter settings.")
    init: Literal["base", "champion"] = field(
        "base", "Where a night's training starts. `base`: a fresh adapter on the base model. `champion`: the adapter "
        "in service, loaded as trainable weights and trained further (its LoRA shape and base model must match this "
        "config; with no champion yet it starts from base and says so). For DPO the reference model is then the "
        "starting policy, base + champion adapter, not the bare base.")
    data: Literal["all", "new"] = field(
        "all", "What a night trains on. `all`: every templated row. `new` (needs init: champion): the rows the "
        "starting adapter's chain never trained on (an edited seed counts as new), plus a replay sample of those it "
        "did (`replay`).")
    replay: int | float = field(
        2.0, "With data: new, rows already trained on that are trained again, drawn from the whole history and "
        "seeded by the night's train key (a retry reads the same rows): a float is a share of the new rows' count, "
        "an integer a number of rows. The default, twice the new rows, is what bench/nightly_train.py found to forget "
        "least for its cost (half as many forgot most of what was not replayed within two nights).", ge=0)
    continue_learning_rate: float | None = field(
        None, "Peak learning rate of a continued night (one that starts from the champion). None: learning_rate. "
        "Lower than a fresh adapter's: the adapter already holds what it learned, and a high rate on a few new "
        "rows overwrites it.", gt=0, le=1)
    continue_epochs: float | None = field(
        None, "Passes over a continued night's rows (new plus replay). None: epochs.", gt=0)
    rebase_every: int = field(
        0, "With init: champion, at most this many adapters in a chain: every rebase_every-th night starts from "
        "base on all rows again (2 alternates base and continued). 0: never.", ge=0)
    learning_rate: float = field(2e-4, "Peak learning rate.", gt=0, le=1)
    epochs: float = field(1.0, "Passes over the training data (ignored when max_steps > 0).", gt=0)
    max_steps: int = field(-1, "Optimizer steps to run; -1 runs `epochs` instead.", ge=-1)
    batch_size: int = field(4, "Micro-batch size per device (halved on CUDA out-of-memory).", ge=1)
    gradient_accumulation_steps: int = field(1, "Micro-batches per optimizer step.", ge=1)
    auto_micro_batch: bool = field(
        True, "On CUDA, choose the micro-batch and accumulation (same effective batch, batch_size x "
        "gradient_accumulation_steps) from the memory estimate: the largest that fits without activation "
        "checkpointing, else with it.", affects_output=False)
    memory_budget: float = field(0.6, "Share of the GPU's memory the plan may use.", gt=0, le=1, affects_output=False)
    warmup_ratio: float = field(0.0, "Share of optimizer steps spent warming up the learning rate.", ge=0, lt=1)
    beta: float = field(0.1, "DPO beta: how far the policy may move from the reference.", gt=0)
    seed: int = field(0, "Random seed for initialisation and data order.")
    packing: bool | None = field(
        None, "Pack rows into max_length blocks. None: on when CUDA and FlashAttention (no cross-row attention) exist.",
        resolved=True)
    liger: bool | None = field(None, "Liger kernels. None: on when CUDA is present and liger-kernel is installed.",
                               resolved=True)
    merge: bool = field(
        False, "Also export the base with the adapter merged in (safetensors), checked to generate what the adapter "
        "does. Added to a finished adapter when turned on later, without retraining.", affects_output=False)
    logging_steps: int = field(5, "Log the loss every this many steps.", ge=1, affects_output=False)
    save_steps: int = field(50, "Save a checkpoint every this many steps.", ge=1, affects_output=False)
    save_total_limit: int = field(2, "Checkpoints kept on disk.", ge=1, affects_output=False)
    num_processes: int = field(
        1, "Processes to train on, one per GPU: above 1 the child is started with `accelerate launch` (DDP; FSDP "
        "for QLoRA), or on a CPU with torch's launcher (gloo). The global batch (batch_size x "
        "gradient_accumulation_steps) stays what it is on one process: each rank takes an equal share.",
        ge=1, affects_output=False)
    engine: Literal["local", "ray"] = field(
        "local", "Where training runs: `local` (this machine, num_processes ranks) or `ray` (Ray Train's TorchTrainer, "
        "num_workers workers on a Ray cluster; pip install 'synthtune[ray]'). Checkpoints go to the artifact root; a "
        "lost worker resumes from the newest one.", affects_output=False)
    ray_address: str = field(
        "", "engine=ray: the cluster (`ray://head:10001`, or `auto` on a cluster node). Empty: start a local cluster "
        "for the run and stop it after.", affects_output=False)
    num_workers: int = field(
        2, "engine=ray: training workers (ranks). The global batch stays what it is on one process: each worker "
        "takes an equal share.", ge=1, le=1024, affects_output=False)
    ray_cpus_per_worker: int = field(1, "engine=ray: CPUs each worker asks Ray for.", ge=1, affects_output=False)
    ray_gpus_per_worker: int = field(0, "engine=ray: GPUs each worker asks Ray for (0: train on CPUs).", ge=0,
                                     affects_output=False)
    ray_max_failures: int = field(
        3, "engine=ray: worker failures Ray Train recovers from in one run (FailureConfig), each time on a new worker "
        "group resuming from the newest checkpoint.", ge=0, affects_output=False)

    @model_validator(mode="after")
    def _lineage(self) -> TrainConfig:
        if self.data == "new" and self.init != "champion":
            raise ValueError("train.data: new trains on what the starting adapter has not seen, so it needs "
                             f"train.init: champion (train.init is {self.init})")
        if self.engine == "ray" and self.num_processes > 1:
            raise ValueError("train.engine: ray runs train.num_workers workers (ranks); leave train.num_processes at 1 "
                             f"(it is {self.num_processes})")
        return self

    @property
    def ranks(self) -> int:
        """How many processes train: Ray's workers, or this machine's processes."""
        return self.num_workers if self.engine == "ray" else self.num_processes
