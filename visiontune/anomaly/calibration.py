"""The good scores behind an anomaly threshold, when good images are few.

Holding 10% of 25 good images out left 2-3 scores to set a 99th-percentile threshold, in effect
the highest of three, and a third to a half of new good images were flagged (issue 12). Below
KFOLD_BELOW good images, every training image is scored instead by a detector fitted on the other
folds ("out of bank", as a new good image is scored by the final detector), so all of them
calibrate the threshold, and the detector kept still fits on all of them. Patch embeddings are
computed once and reused by the folds while they fit in EMBEDDING_BUDGET; past it they are
computed again for each fold.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from visiontune.data.validate import Skipped
from visiontune.errors import UserError

log = logging.getLogger(__name__)
KFOLDS = 5
KFOLD_BELOW = 100  # good images
EMBEDDING_BUDGET = 1 << 30  # bytes of cached patch embeddings
CALIBRATIONS = ("auto", "kfold", "holdout")


def folds_for(calibration: str, n_images: int) -> int:
    """Folds to calibrate with (0: a held-out share) for `calibration` and this many good images."""
    if calibration not in CALIBRATIONS:
        raise UserError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, not {calibration!r}")
    if calibration == "kfold" or (calibration == "auto" and n_images < KFOLD_BELOW):
        return KFOLDS
    return 0


class Embeddings:
    """Patch embeddings of the readable training images: kept in memory, or recomputed per use."""

    def __init__(self, model, paths: list[Path], tensors: list[torch.Tensor] | None) -> None:
        self.model, self.paths, self.tensors = model, paths, tensors

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        indices = list(indices)
        if self.tensors is None:
            stats = {"load_s": 0.0, "features_s": 0.0, "images": 0}
            yield from self.model._embeddings([self.paths[i] for i in indices], [], stats)
            return
        size = self.model.batch_size
        for start in range(0, len(indices), size):
            yield torch.stack([self.tensors[i] for i in indices[start:start + size]])


def cached_embeddings(model, files: Sequence[Path], skipped: list[Skipped], stats: dict) -> Embeddings:
    """One pass over `files`, as `AnomalyModel._embeddings`, keeping the embeddings per image."""
    paths: list[Path] = []
    tensors: list[torch.Tensor] | None = []
    held = 0
    for images, indices in model._batches(files, skipped, stats):
        started = time.perf_counter()
        embedding = model._embed(images)
        stats["features_s"] += time.perf_counter() - started
        stats["images"] += len(indices)
        paths += [files[i] for i in indices]
        held += embedding.numel() * embedding.element_size()
        tensors = tensors + list(embedding.unbind(0)) if tensors is not None and held <= EMBEDDING_BUDGET else None
    if len(paths) < 2:
        raise UserError(f"fitting needs at least 2 readable good images, got {len(paths)}; see the skipped files")
    return Embeddings(model, paths, tensors)


def out_of_fold_scores(model, embeddings: Embeddings, folds: int, seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Every image's score from a detector fitted without its fold, and the heat-map range."""
    folds = min(folds, len(embeddings))
    fold_of = np.random.default_rng(seed).permutation(len(embeddings)) % folds
    parts = []
    for fold in range(folds):
        detector = type(model.detector)(**model.detector.params())
        detector.fit(embeddings.batches(np.flatnonzero(fold_of != fold)))
        parts += [model.score_embedding(detector, batch) for batch in embeddings.batches(np.flatnonzero(fold_of == fold))]
    return score_range(parts)


def score_range(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, tuple[float, float]]:
    """(image scores, heat-map range) of (scores, maps) parts: the range is the median pixel (over
    every 4th row and column, so memory stays small) and the maximum pixel."""
    scores = np.concatenate([s for s, _ in parts])
    pixels = np.concatenate([m[:, ::4, ::4].ravel() for _, m in parts])
    return scores, (float(np.median(pixels)), float(max(m.max(initial=-np.inf) for _, m in parts)))


def warn_if_too_few(n_scores: int, false_alarm_rate: float) -> None:
    """A (1 - rate) quantile of fewer than 1 / rate scores is close to their maximum, not that quantile."""
    if false_alarm_rate > 0 and n_scores < math.ceil(1 / false_alarm_rate):
        log.warning(
            "the threshold rests on %d good image scores, too few for a %.3g%% false-alarm rate (that needs "
            "at least %d): it is close to their highest score, and new good images may be flagged more often",
            n_scores, 100 * false_alarm_rate, math.ceil(1 / false_alarm_rate),
        )
