"""PatchCore (Roth et al., 2022): a memory bank of good patches, nearest-neighbour distances.

Patches are locally aware (3x3 average of each backbone map, coarser maps upsampled bilinearly and
concatenated); the bank is a greedy k-center coreset chosen while the features stream past
(see components/coreset.py) in one pass over up to CHUNK_BYTES of patches (a greedy pass per
LATER_CHUNK_PATCHES beyond that, so memory stays bounded and time grows slowly): on the magnetic-tile validation part one pass kept pixel
AUROC 0.02 higher than chunks of 65,536 patches. A patch's score is its distance to the nearest
bank patch. The detector's own image score is the largest patch score, re-weighted by how isolated
its nearest bank patch is among its own neighbours (the paper's eq. 7, as in anomalib); new models
score images from the smoothed map instead (components/anomaly_map.MapScoring), which did better.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from visiontune.anomaly.base import PatchDetector
from visiontune.anomaly.components.coreset import (
    greedy_coreset,
    nearest_neighbours,
    squared_distances,
)
from visiontune.anomaly.components.features import patch_embedding

LOCAL_POOL = 3
CHUNK_BYTES = 2**28  # patch features of the first greedy pass: 441k patches of lite0's 152 dimensions
LATER_CHUNK_PATCHES = 2**16  # patches per greedy pass after the first


class PatchCore(PatchDetector):
    """Fitted: memory_bank_ [m, dim]."""

    method = "patchcore"
    default_strides = (8, 16)  # the backbone levels embedded when no --layers are given

    def __init__(self, coreset_ratio: float = 0.01, num_neighbors: int = 9, projection_dim: int = 128,
                 chunk_patches: int | None = None, seed: int = 0) -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.projection_dim = projection_dim
        self.chunk_patches = chunk_patches
        self.seed = seed

    @classmethod
    def from_options(cls, coreset_ratio: float, chunk_patches: int | None, seed: int, **_) -> PatchCore:
        """Built from `anomaly fit`'s options; those of other detectors are ignored."""
        return cls(coreset_ratio=coreset_ratio, chunk_patches=chunk_patches, seed=seed)

    def params(self) -> dict:
        return dict(coreset_ratio=self.coreset_ratio, num_neighbors=self.num_neighbors,
                    projection_dim=self.projection_dim, chunk_patches=self.chunk_patches, seed=self.seed)

    def embed(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return patch_embedding(maps, pool_size=LOCAL_POOL, mode="bilinear")

    def fit(self, embeddings: Iterable[torch.Tensor]) -> PatchCore:
        chunks = self._patch_chunks(embeddings)
        self.memory_bank_ = greedy_coreset(chunks, self.coreset_ratio, self.projection_dim, self.seed)
        return self

    def _patch_chunks(self, embeddings: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Rows [n, dim] of about `chunk_patches` patches (default: CHUNK_BYTES of them, then
        LATER_CHUNK_PATCHES); each batch is dropped once chunked.

        Each pick of a greedy pass reads every row of its chunk, so a pass costs picks x rows: the
        first pass over 441k rows picks 1% of them; later ones pick 1% of 65,536 rows each (on
        top of their distances to the picks so far), not 1% of another 441k, which on 10,000
        images would read 441k rows for each of their 23k picks (docs/benchmarks.md, issue 19).
        """
        pending: list[torch.Tensor] = []
        rows = 0
        first = True
        for batch in embeddings:
            pending.append(_rows(batch))
            rows += len(pending[-1])
            default = (CHUNK_BYTES // (pending[0].element_size() * pending[0].shape[1]) if first
                       else LATER_CHUNK_PATCHES)
            if rows >= (self.chunk_patches or default):
                chunk, pending, rows, first = torch.cat(pending), [], 0, False
                yield chunk
        if pending:
            yield torch.cat(pending)

    def score(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = embedding.shape
        features = _rows(embedding)
        patch_scores, worst, nearest = self._nearest_bank_patches(features, height * width)
        images = torch.arange(batch, device=embedding.device)
        image_scores = patch_scores[images, worst] * self._isolation_weight(
            features.view(batch, height * width, -1)[images, worst], nearest)
        return patch_scores.view(batch, height, width), image_scores

    def _nearest_bank_patches(self, features: torch.Tensor, patches: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distances [B, patches] to the nearest bank patch, each image's farthest patch [B] and the
        index of its nearest bank patch [B]: torch.cdist's distances and first minimum and maximum,
        with the index found only for the farthest patch of each image, block by block."""
        distances = torch.empty(len(features), dtype=features.dtype, device=features.device)
        worst = torch.zeros(len(features) // patches, dtype=torch.long, device=features.device)
        nearest = torch.zeros_like(worst)
        for start, squared in squared_distances(features, self.memory_bank_):
            block = squared.amin(dim=1).clamp_min_(0).sqrt_()
            distances[start:start + len(block)] = block
            for image in range(start // patches, (start + len(block) - 1) // patches + 1):
                first, stop = max(image * patches, start), min((image + 1) * patches, start + len(block))
                row = first + int(block[first - start:stop - start].argmax())
                if image * patches == first or distances[row] > distances[image * patches + worst[image]]:
                    worst[image] = row - image * patches
                    nearest[image] = squared[row - start].clamp_min(0).sqrt_().argmin()
        return distances.view(-1, patches), worst, nearest

    def _isolation_weight(self, worst_patches: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """1 - softmax over the distances to the nearest bank patch and its bank neighbours."""
        k = min(self.num_neighbors, len(self.memory_bank_))
        if k < 2:
            return torch.ones(len(worst_patches), device=worst_patches.device)
        _, support = nearest_neighbours(self.memory_bank_[nearest], self.memory_bank_, k)
        distances = torch.linalg.vector_norm(worst_patches[:, None] - self.memory_bank_[support], dim=-1)
        return 1 - torch.softmax(distances, dim=1)[:, 0]

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_}

    def restore(self, tensors: dict[str, torch.Tensor]) -> PatchCore:
        self.memory_bank_ = tensors["memory_bank"]
        return self

    def to(self, device: torch.device) -> PatchCore:
        self.memory_bank_ = self.memory_bank_.to(device)
        return self


def _rows(embedding: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B*h*w, C], patches of an image consecutive in row-major order."""
    return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
