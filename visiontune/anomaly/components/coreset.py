"""Greedy k-center coreset selection that streams over chunks of patch features.

anomalib holds every training patch in memory and runs the greedy loop over all of them: memory
grows with the data and time with its square. Here rows arrive in chunks and only one chunk plus
the selection so far is held. A chunk's greedy loop starts from each row's distance to everything
already selected, so it only adds centres where earlier chunks left its rows uncovered, and the
selection keeps `ratio` of all rows seen. The loop costs O(selected x chunk x dim), linear in the
data; the distances of each new chunk to the selection so far are one blocked matrix product,
O(rows x selected x dim), quadratic in the data but at matrix-multiply speed. Distances for the
selection use a Gaussian random projection (Johnson-Lindenstrauss) to `projection_dim`
dimensions when the features have more; the selected rows keep all their dimensions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from visiontune.anomaly.components.threads import one_thread

# Rows x selected centres per block when computing nearest distances: 2^24 floats = 64 MiB.
BLOCK_ELEMENTS = 2**24


def greedy_coreset(chunks: Iterable[torch.Tensor], ratio: float, projection_dim: int = 256,
                   seed: int = 0) -> torch.Tensor:
    """Select about `ratio` of all rows of `chunks` (each [n, D]) by greedy k-center; [m, D]."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    generator = torch.Generator().manual_seed(seed)
    selected: list[torch.Tensor] = []
    selected_projected: list[torch.Tensor] = []
    projection: torch.Tensor | None = None
    seen = n_selected = 0
    for chunk in chunks:
        if projection is None:
            projection = _random_projection(chunk.shape[1], projection_dim, generator).to(chunk.device)
        projected = chunk @ projection if projection.shape[0] != projection.shape[1] else chunk
        seen += len(chunk)
        budget = min(len(chunk), max(1, round(ratio * seen)) - n_selected)
        if budget <= 0:
            continue
        previous = torch.cat(selected_projected) if selected_projected else None
        picks = _greedy_select(projected, budget, previous, generator)
        selected.append(chunk[picks])
        selected_projected.append(projected[picks])
        n_selected += budget
    if not selected:
        raise ValueError("no rows to select from")
    return torch.cat(selected)


def _random_projection(dim: int, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    if dim <= projection_dim:
        return torch.eye(dim)
    return torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5


def _greedy_select(rows: torch.Tensor, budget: int, previous: torch.Tensor | None,
                   generator: torch.Generator) -> torch.Tensor:
    """Indices of `budget` rows, each the farthest from all centres chosen before it."""
    squared_norms = rows.pow(2).sum(1)
    if previous is None:
        first = torch.randint(len(rows), (1,), generator=generator).to(rows.device)[0]
        min_distance = torch.full_like(squared_norms, float("inf"))
    else:
        min_distance = nearest_squared_distance(rows, previous)
        first = min_distance.argmax()
    picks = [first]
    with one_thread():
        for step in range(budget):
            centre = rows[picks[-1]]
            distance = torch.addmv(squared_norms, rows, centre, alpha=-2).add_(centre.pow(2).sum())
            torch.minimum(min_distance, distance, out=min_distance)
            if step + 1 < budget:
                picks.append(min_distance.argmax())
    return torch.stack(picks)


def nearest_squared_distance(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """min_j |q_i - r_j|^2 for each query row: torch.cdist's distance to the nearest, squared."""
    minima = torch.cat([block.amin(dim=1) for _, block in squared_distances(queries, references)])
    return minima.clamp_min_(0).sqrt_().pow(2)


def squared_distances(queries: torch.Tensor, references: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, |q - r|^2 [rows, len(references)]) for blocks of query rows of bounded memory.

    Computed as torch.cdist computes them before clamping at 0 and taking the square root: the
    matrix product of rows [-2q, |q|^2, 1] and [r, 1, |r|^2], for the same blocks of rows as
    `nearest_neighbours`, so the products have the same shapes and the values are cdist's bit for
    bit. A row's minimum taken before the square root and without its index (amin) made
    PatchCore's scoring 1.6x faster than torch.cdist(...).min(dim=1) (22 vs 36 ms per 256 px image).
    """
    squared = queries.pow(2).sum(-1, keepdim=True)
    padded_queries = torch.cat([queries.mul(-2), squared, torch.ones_like(squared)], -1)
    squared = references.pow(2).sum(-1, keepdim=True)
    padded_references = torch.cat([references, torch.ones_like(squared), squared], -1).mT
    block = max(1, BLOCK_ELEMENTS // max(1, len(references)))
    for start in range(0, len(queries), block):
        yield start, padded_queries[start:start + block] @ padded_references


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, k: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances [n] (or [n, k]) and indices of each query's nearest references."""
    block = max(1, BLOCK_ELEMENTS // max(1, len(references)))
    distances, indices = [], []
    for start in range(0, len(queries), block):
        pairwise = torch.cdist(queries[start:start + block], references)
        found = pairwise.min(dim=1, keepdim=True) if k == 1 else pairwise.topk(k, dim=1, largest=False)
        distances.append(found.values)
        indices.append(found.indices)
    distances_, indices_ = torch.cat(distances), torch.cat(indices)
    return (distances_[:, 0], indices_[:, 0]) if k == 1 else (distances_, indices_)
