"""PaDiM (Defard et al., 2020): a Gaussian of good features at every position, Mahalanobis scores.

Backbone maps are upsampled (nearest) to the finest one and concatenated; a fixed random subset
of channels keeps the per-position covariance small (the paper's 100 of ResNet18's 448, 550 of
Wide-ResNet50's 1,792). The Gaussians are estimated in one streaming pass (components/gaussian.py),
so memory does not grow with the number of images. Image scores come from the smoothed map
(components/anomaly_map.MapScoring).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch

from visiontune.anomaly.base import PatchDetector
from visiontune.anomaly.components.features import patch_embedding
from visiontune.anomaly.components.gaussian import PositionGaussians


def default_n_features(channels: int) -> int:
    return min(channels, 550 if channels > 1000 else 100)


class Padim(PatchDetector):
    """Fitted: channel_index_ [d], gaussians_ (mean_ [positions, d], whitening_ [positions, d, d])."""

    method = "padim"
    default_strides = (4, 8, 16)  # the backbone levels embedded when no --layers are given

    def __init__(self, n_features: int | None = None, regularization: float = 0.01, seed: int = 0) -> None:
        self.n_features = n_features
        self.regularization = regularization
        self.seed = seed

    @classmethod
    def from_options(cls, n_features: int | None, seed: int, **_) -> Padim:
        """Built from `anomaly fit`'s options; those of other detectors are ignored."""
        return cls(n_features=n_features, seed=seed)

    def params(self) -> dict:
        return dict(n_features=self.n_features, regularization=self.regularization, seed=self.seed)

    def embed(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return patch_embedding(maps, pool_size=1, mode="nearest")

    def fit(self, embeddings: Iterable[torch.Tensor]) -> Padim:
        stream = iter(embeddings)
        first = next(stream)
        channels = first.shape[1]
        keep = min(self.n_features or default_n_features(channels), channels)
        generator = torch.Generator().manual_seed(self.seed)
        self.channel_index_ = torch.randperm(channels, generator=generator)[:keep].sort().values.to(first.device)
        positions = (self._by_position(batch) for batch in itertools.chain([first], stream))
        self.gaussians_ = PositionGaussians(self.regularization).fit(positions)
        return self

    def _by_position(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [h*w, B, d] over the kept channels."""
        selected = embedding.index_select(1, self.channel_index_)
        return selected.flatten(2).permute(2, 0, 1).contiguous()

    def score(self, embedding: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch, _, height, width = embedding.shape
        distances = self.gaussians_.mahalanobis(self._by_position(embedding))
        return distances.T.reshape(batch, height, width), None

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {"channel_index": self.channel_index_, "mean": self.gaussians_.mean_,
                "whitening": self.gaussians_.whitening_}

    def restore(self, tensors: dict[str, torch.Tensor]) -> Padim:
        self.channel_index_ = tensors["channel_index"]
        self.gaussians_ = PositionGaussians(self.regularization).restore(tensors["mean"], tensors["whitening"])
        return self

    def to(self, device: torch.device) -> Padim:
        self.channel_index_ = self.channel_index_.to(device)
        self.gaussians_.to(device)
        return self
