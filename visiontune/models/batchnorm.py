"""BatchNorm folded into the convolution before it: the same outputs in eval mode, fewer kernels.

Used by frozen-feature extraction and cached-feature training, where the backbone never trains.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def folded_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy with its BatchNorms folded (`fold_batch_norms`), or None when none folds."""
    folded = copy.deepcopy(model)
    return folded if fold_batch_norms(folded) else None


def fold_batch_norms(model: nn.Module) -> int:
    """Fold BatchNorms into the convolution registered just before them (timm's CNNs register
    them in execution order); a BatchNormAct2d leaves its dropout and activation in its place.
    Returns how many were folded; callers check the output is unchanged before trusting it."""
    count = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, norm) in itertools.pairwise(children):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                    and norm.num_features == conv.out_channels and norm.track_running_stats):
                continue
            weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
            bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, weight, bias)
            rest = [module for module in (getattr(norm, "drop", None), getattr(norm, "act", None)) if module is not None]
            setattr(parent, name, nn.Sequential(*rest) if rest else nn.Identity())
            count += 1
    return count
