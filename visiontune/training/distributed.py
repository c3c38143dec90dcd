"""Several processes training one run (DDP on Lightning Fabric): who writes, and how data and metrics
are split across processes and joined again.

`--batch-size` is the global batch: each of N processes takes B/N samples of every batch. The
sampler's draws are the single-process ones (its generator is seeded alike on every rank) split
by stride, so the N shares of a batch are exactly the batch one process would have drawn (with
`drop_last`; DistributedSampler pads a last partial batch with repeats otherwise). DDP averages
the gradients of equal shares, which is the gradient of the mean loss over the whole batch.
Evaluation shards too; each process's predictions travel with their dataset indices and are
joined with the padding's repeats dropped, so every rank gets the metrics of each sample once.
Rank 0 alone writes the run directory; the others compute the same numbers and write nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed
from lightning.fabric import Fabric
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import Dataset, Sampler

from visiontune.errors import UserError

T = TypeVar("T")


class Indexed(Dataset):
    """`dataset`'s items with their index appended: (image, target, index), or None when unreadable."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (*item, index)


def per_process_batch(batch_size: int, world_size: int) -> int:
    """The share of the global `batch_size` each process takes; it must divide evenly."""
    if batch_size % world_size:
        raise UserError(
            f"--batch-size {batch_size} is the global batch and must divide by the {world_size} processes "
            f"(each takes an equal share); use e.g. {max(1, round(batch_size / world_size)) * world_size}"
        )
    return batch_size // world_size


def shard_sampler(sampler: Sampler, fabric: Fabric, drop_last: bool) -> Sampler:
    """This rank's stride of `sampler`'s draws (the sampler itself in a single process).

    With `drop_last` the draws are cut to a multiple of the processes, so the full global batches
    are those of one process and the last partial one is dropped by both alike.
    """
    if fabric.world_size == 1:
        return sampler
    return DistributedSamplerWrapper(
        sampler, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=False, drop_last=drop_last,
    )


def on_rank_zero(fabric: Fabric, action: Callable[[], T]) -> T:
    """`action()` on rank 0 only, and its result (or its UserError) on every rank.

    A run directory that is named by the time, or refused, must be the same on all ranks, and a
    refusal must stop every rank, not leave the others waiting for rank 0.
    """
    if fabric.world_size == 1:
        return action()
    result, error = None, None
    if fabric.is_global_zero:
        try:
            result = action()
        except UserError as exc:
            error = exc
    result, message = fabric.broadcast((result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def gather_rows(fabric: Fabric, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` (any number each; same columns), concatenated in rank order on every rank."""
    if fabric.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(fabric.world_size)]
    torch.distributed.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(fabric.world_size)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(gathered, counts)])


def first_of_each(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each index, in index order: DistributedSampler's padding dropped."""
    ordered, positions = indices.sort(stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return positions[first]


def sum_across(fabric: Fabric, values: torch.Tensor) -> torch.Tensor:
    """`values` added up over the ranks (itself in a single process)."""
    return values if fabric.world_size == 1 else fabric.all_reduce(values, reduce_op="sum")
