"""A classifier's logits together with the pooled features its head reads (the penultimate layer).

Out-of-distribution scores (`visiontune.ood`) compare these features with the training images';
one forward pass gives both, and an ONNX graph exports both, for nothing over the logits alone.
"""

from __future__ import annotations

import torch
from torch import nn


def logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pre-logit features) of an eval-mode timm classifier, in one pass."""
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    return model.get_classifier()(features), features


class LogitsAndFeatures(nn.Module):
    """`model` with two outputs, for export: the logits and the features they are computed from."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.model, images)
