"""Faults injected into the child processes synthtune starts (the training child, the merge), from
the test that wants them, so production code carries no test hook: a `sitecustomize` module on the
child's PYTHONPATH patches a library function when the child starts. Only children started while
the fixture is active see it (it sets PYTHONPATH in this test's environment)."""

from __future__ import annotations

from pathlib import Path

# the training child behaves as if CUDA ran out of memory above a micro-batch of {n}
OOM_ABOVE_BATCH = """
import synthtune.stages.train as _train

_load = _train.load_student


def load_student(*args, **kwargs):
    import torch
    import transformers

    fit = transformers.Trainer.train

    def train(self, *a, **k):
        if self.args.per_device_train_batch_size > {n}:
            raise torch.OutOfMemoryError(f"injected: batch {{self.args.per_device_train_batch_size}} > {n}")
        return fit(self, *a, **k)

    transformers.Trainer.train = train
    return _load(*args, **kwargs)


_train.load_student = load_student
"""

# the merge goes through the wrong dtype ({dtype}): the merged export no longer generates what the adapter does
MERGE_DTYPE = """
import synthtune.stages.train as _train

_load = _train.load_student


def load_student(*args, **kwargs):
    import torch
    from peft.tuners.lora import LoraModel  # what PeftModel.merge_and_unload reaches

    merge = LoraModel.merge_and_unload

    def merge_and_unload(self, *a, **k):
        merged = merge(self, *a, **k)
        with torch.no_grad():
            for p in merged.parameters():
                p.copy_(p.to(torch.{dtype}).to(p.dtype))
        return merged

    LoraModel.merge_and_unload = merge_and_unload
    return _load(*args, **kwargs)


_train.load_student = load_student
"""


def inject(monkeypatch, folder: Path, code: str) -> None:
    """Children started from now on in this test run `code` first (a sitecustomize in `folder`)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p))

# the training child dies as it starts, before any step (a crashed night: nothing committed)
CRASH_AT_START = """
import os

import synthtune.stages.train as _train


def load_student(*args, **kwargs):
    os._exit(9)


_train.load_student = load_student
"""
