"""Where work runs: `--device auto|cpu|cuda`, and how many threads and loader workers a CPU gets.

On a small CPU, torch's threads and DataLoader workers compete for the same cores, and a busy
neighbour turns extra threads into a large slowdown (threads that wait on a descheduled peer).
So the plan counts the cores that are actually free right now, not the cores that exist.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

import torch

from visiontune.errors import UserError


def resolve_device(device: str = "auto") -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class CpuPlan:
    cores: int  # cores this process may run on
    busy: float  # cores' worth of time other processes used while we looked
    threads: int  # torch intra-op threads
    workers: int  # DataLoader worker processes

    def apply(self) -> CpuPlan:
        torch.set_num_threads(self.threads)
        return self

    def describe(self) -> str:
        return f"{self.threads} torch thread(s), {self.workers} loader worker(s) ({self.cores} cores, {self.busy:.1f} busy)"


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(interval: float = 0.2) -> float:
    """Cores' worth of CPU time used by anyone over `interval` seconds (we sleep meanwhile)."""
    first = _cpu_times()
    if first is None:
        return max(0.0, os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    time.sleep(interval)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total if total > 0 else 0.0


def plan_cpu(
    threads: int | None = None, workers: int | None = None, loader: bool = True, overlap_decode: bool = False,
) -> CpuPlan:
    """Torch threads and decode workers for the cores free now; explicit values are kept as given.

    Up to 3 free cores, decoding stays in the main process: on 2 cores a worker process beside 2
    torch threads made both training and frozen-feature extraction slower (docs/benchmarks.md,
    issue #5). Larger machines give a quarter of the free cores (at most 4) to decoding.
    `overlap_decode` (inference, where a fast model makes decoding a large share): at least one
    worker once 2 cores are free, beside threads for every free core, which measured 2.3x vs
    1.7x (no worker) and 2.0x (one thread fewer) the naive loop on 2 cores.
    `loader=False`: no decoding at all, so no workers.
    """
    cores = usable_cores()
    busy = busy_cores() if threads is None or workers is None else 0.0
    free = max(1, min(cores, round(cores - busy)))
    if workers is None:
        workers = (max(int(overlap_decode and free > 1), min(4, free // 4))) if loader else 0
    if threads is None:
        threads = free if overlap_decode else max(1, free - workers)  # decoding waits on I/O and the model
    return CpuPlan(cores, busy, max(1, threads), max(0, workers))


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation, for a process that ends when
    its command does (the CLI's scoring commands); False where the C library is not glibc.

    By default glibc maps every block over 32 MiB afresh and returns it on free, so each batch's
    large activations fault in new zeroed pages: about 10,000 page faults per image and 16 instead
    of 30 images/s for `anomaly evaluate` at 256 px on 2 CPU cores (tf_efficientnet_lite0, batch
    16), 300 with this. Memory is then returned to the system only at exit.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _cpu_times() -> tuple[float, float] | None:
    """(total, idle incl. iowait) jiffies from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    return sum(fields[:8]), fields[3] + fields[4]
