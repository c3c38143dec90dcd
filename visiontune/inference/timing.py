"""A small, honest timer: warm-up runs first, then the median of repeats, with CUDA synchronised.

CUDA kernels run asynchronously, so a GPU timing without `torch.cuda.synchronize()` on both sides
measures only the launch. The median ignores the odd repeat a busy neighbour slowed down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    repeats: list[float]

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how noisy the measurement was."""
        return (max(self.repeats) - min(self.repeats)) / self.median if self.median > 0 else 0.0


def time_call(
    fn: Callable[[], object],
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed; the median call time."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else _nothing
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return Timing(statistics.median(times), times)


def _nothing() -> None:
    return None
