"""One CPU thread for loops of tiny kernels, which more threads slow down on a busy machine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run many tiny CPU kernels on one thread: the greedy coreset loop and batched 100x100
    triangular solves. Split over OpenMP/MKL threads they are 2x faster on an idle 2-core machine
    but 30-200x slower when another process keeps a core busy (measured: 0.6 s -> 18 s for 655
    coreset picks, 0.03 s -> 6 s for 1,024 solves); on one thread they take 1.1 s and 0.03 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
