"""AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", 2016).

A BatchNorm's running statistics describe the domain it was trained on; re-estimating them on
target images (no labels) moves the features of a shifted domain back to where the layers after
them expect them. Nothing else changes: every weight, bias and non-BatchNorm buffer is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of `model` that keep running statistics (timm's BatchNormAct2d included)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running mean and variance by their average over `batches`.

    The statistics are reset and re-accumulated with momentum None (PyTorch's cumulative average,
    one equal weight per batch); only the BatchNorms run in train mode, so dropout and the like
    stay off. A batch of one image is skipped (a 1x1 feature map has no variance to measure).
    The model is left in eval mode; returns the number of batches used.
    """
    norms = batch_norms(model)
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    used = 0
    try:
        for batch in batches:
            if batch.shape[0] < 2:
                continue
            model(batch)
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    return used
