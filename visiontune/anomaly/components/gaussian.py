"""One multivariate Gaussian per feature-map position (PaDiM), estimated in a single stream.

Batches are merged with Chan et al.'s pairwise update of mean and scatter matrix, in place and a
block of positions at a time, so memory is the size of the model (positions x dim x dim), never of
the data. The covariance is regularised (+ `regularization` x I, as in the PaDiM paper) and
factorised with a Cholesky decomposition L L^T; the Mahalanobis distance is |(x - mean) L^-T|. No
general (pivoting, LU-based) inverse is used: batched `torch.linalg.inv` fails on CPU with MKL
(SLASWP error) once `torch.set_num_threads(n >= 2)` has been called, which crashed anomalib's PaDiM.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from visiontune.anomaly.components.threads import one_thread

# Positions per block for the in-place updates: bounds temporaries to a slice of the model.
POSITION_BLOCK = 256
# Extra diagonal tries when a covariance is not positive definite in float32.
JITTER_TRIES = 4


class PositionGaussians:
    """Gaussians over [positions, samples, dim] features; fitted: mean_, whitening_ (L^-T)."""

    def __init__(self, regularization: float = 0.01) -> None:
        self.regularization = regularization

    def fit(self, batches: Iterable[torch.Tensor]) -> PositionGaussians:
        """Each batch is [positions, n, dim]; at least two samples in all."""
        count, mean, scatter = 0, None, None
        for batch in batches:
            n = batch.shape[1]
            batch_mean = batch.mean(dim=1)
            if mean is None:
                positions, dim = batch_mean.shape
                mean = torch.zeros_like(batch_mean)
                scatter = torch.zeros(positions, dim, dim, dtype=batch.dtype, device=batch.device)
            delta = batch_mean - mean
            total = count + n
            for start in range(0, len(mean), POSITION_BLOCK):
                block = slice(start, start + POSITION_BLOCK)
                centred = batch[block] - batch_mean[block, None]
                scatter[block].baddbmm_(centred.transpose(1, 2), centred)
                scatter[block].baddbmm_(delta[block, :, None], delta[block, None, :], alpha=count * n / total)
            mean += delta * (n / total)
            count = total
        if count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {count}")
        scatter /= count - 1
        self.whitening_ = _whitening(scatter, self.regularization)
        self.mean_ = mean
        return self

    def restore(self, mean: torch.Tensor, whitening: torch.Tensor) -> PositionGaussians:
        """Set the fitted attributes saved from an earlier `fit`."""
        self.mean_, self.whitening_ = mean, whitening
        return self

    def to(self, device: torch.device) -> PositionGaussians:
        self.mean_, self.whitening_ = self.mean_.to(device), self.whitening_.to(device)
        return self

    def mahalanobis(self, features: torch.Tensor) -> torch.Tensor:
        """Distances [positions, n] of features [positions, n, dim] to each position's Gaussian."""
        whitened = torch.bmm(features - self.mean_[:, None], self.whitening_)
        return whitened.pow(2).sum(-1).sqrt()


def _whitening(covariance: torch.Tensor, regularization: float) -> torch.Tensor:
    """L^-T with L L^T = covariance + regularization I, block by block, in place of `covariance`.

    Solved from the right (X L^T = I): in torch 2.15 on CPU the left-side solve for L^-1 took 20x longer.
    """
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    with one_thread():
        for start in range(0, len(covariance), POSITION_BLOCK):
            _whiten_block(covariance[start:start + POSITION_BLOCK], regularization, eye)
    return covariance


def _whiten_block(block: torch.Tensor, regularization: float, eye: torch.Tensor) -> None:
    block += regularization * eye
    factor, info = torch.linalg.cholesky_ex(block)
    jitter = regularization
    for _ in range(JITTER_TRIES):  # float32 round-off can leave a tiny negative eigenvalue
        if not info.any():
            break
        jitter *= 10
        failed = info > 0
        block[failed] += jitter * eye
        factor[failed], info[failed] = torch.linalg.cholesky_ex(block[failed])
    if info.any():
        raise ValueError("covariance is not positive definite even after regularisation")
    block.copy_(torch.linalg.solve_triangular(factor.mT, eye.expand_as(factor), upper=True, left=False))
