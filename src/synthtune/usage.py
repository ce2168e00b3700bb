"""What a stage used while it built its output, recorded in the output's manifest (`usage`), read by
synthtune.ledger:

- wall and CPU seconds (this process and the children it waited for: the training child, distilabel's);
- on a machine with CUDA devices, for the stages that hold them: the devices, device-seconds (wall x
  devices) and the peak memory per device, from NVML (every process on the device, children
  included; sampled twice a second) and torch.cuda (this process, exact). Without a device `gpu` is
  None and `gpu_absent` says why: never a zero that looks measured;
- the teacher's and judge's calls, filled in by the generate stage (synthtune.generation.Calls).

The work pool a stage ran in (for its GPU price) comes from the orchestrator: the Prefect task sets
POOL from its flow run.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterator

NO_DEVICE = "no CUDA device on this machine"
POOL: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthtune_work_pool", default=None)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def visible_devices() -> tuple[list[int], str | None]:
    """(CUDA device indices this process may use, how they were found), or ([], None). NVML first (no
    CUDA context is made); torch only when it is imported already (importing it costs seconds)."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        if listed is not None:
            wanted = [int(d) for d in listed.split(",") if d.strip().isdigit()]
            return [d for d in wanted if d < count], "nvml"
        return list(range(count)), "nvml"
    except Exception:  # no NVML library, or no driver
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return list(range(torch.cuda.device_count())), "torch"
    return [], None


class _Sampler:
    """Peak used memory per device from NVML, sampled in a thread until stopped."""

    def __init__(self, devices: list[int]):
        import pynvml

        self.pynvml, self.peak = pynvml, dict.fromkeys(devices, 0)
        self.handles = {d: pynvml.nvmlDeviceGetHandleByIndex(d) for d in devices}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="synthtune-gpu-sampler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            for d, h in self.handles.items():
                with contextlib.suppress(Exception):
                    self.peak[d] = max(self.peak[d], self.pynvml.nvmlDeviceGetMemoryInfo(h).used)
            if self.done.wait(0.5):
                return

    def stop(self) -> dict[int, int]:
        self.done.set()
        self.thread.join(timeout=2)
        return self.peak


@contextlib.contextmanager
def measured(usage: dict, devices: bool = True) -> Iterator[None]:
    """Fill `usage` with what the block used: wall_s, cpu_s, and `gpu` (or `gpu_absent`) when `devices`
    (the stage holds the machine's GPUs)."""
    wall, cpu = time.monotonic(), _cpu_seconds()
    found, how = visible_devices() if devices else ([], None)
    sampler = _Sampler(found) if how == "nvml" and found else None
    torch = sys.modules.get("torch")
    if found and torch is not None and torch.cuda.is_initialized():
        for d in found:
            with contextlib.suppress(Exception):
                torch.cuda.reset_peak_memory_stats(d)
    try:
        yield
    finally:
        seconds = time.monotonic() - wall
        usage.update(wall_s=round(seconds, 3), cpu_s=round(_cpu_seconds() - cpu, 3), pool=POOL.get())
        if not devices:
            usage["gpu"], usage["gpu_absent"] = None, "this stage holds no GPU"
        elif not found:
            usage["gpu"], usage["gpu_absent"] = None, NO_DEVICE
        else:
            peaks = sampler.stop() if sampler else {}
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                for d in found:
                    with contextlib.suppress(Exception):
                        peaks[d] = max(peaks.get(d, 0), torch.cuda.max_memory_reserved(d))
            usage["gpu"] = {"devices": len(found), "device_seconds": round(seconds * len(found), 3),
                            "peak_memory_gib": {str(d): round(b / 2**30, 3) for d, b in sorted(peaks.items())} or None,
                            "source": how}
