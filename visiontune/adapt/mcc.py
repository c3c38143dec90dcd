"""Minimum Class Confusion (Jin et al., "Minimum Class Confusion for Versatile Domain Adaptation", ECCV 2020).

On unlabelled target batches, MCC penalises the probability mass a batch puts on pairs of
different classes, so the classifier stops hedging between classes on the new domain. This follows
the Transfer-Learning-Library's `tllib.alignment.mcc.MinimumClassConfusionLoss` line by line;
tllib itself is unmaintained and pins old torch / torchvision versions, so it is not a dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPERATURE = 2.5  # the paper's and tllib's value
ENTROPY_EPSILON = 1e-5  # tllib's


def prediction_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy (nats) of rows of class probabilities."""
    return -(probabilities * torch.log(probabilities + ENTROPY_EPSILON)).sum(dim=1)


class MinimumClassConfusionLoss(nn.Module):
    """(sum(confusion) - trace(confusion)) / num_classes for a batch of target logits.

    Probabilities are softened by `temperature`; confident samples weigh more (1 + exp(-entropy),
    rescaled to sum to the batch size); the class-confusion matrix is normalised by its row sums.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        batch_size, num_classes = logits.shape
        predictions = F.softmax(logits.float() / self.temperature, dim=1)
        weight = 1 + torch.exp(-prediction_entropy(predictions).detach())
        weight = (batch_size * weight / weight.sum()).unsqueeze(dim=1)
        confusion = (predictions * weight).transpose(1, 0).mm(predictions)
        # as in tllib, entry (i, j) is divided by the sum of row j; the matrix is symmetric, so every column sums to 1
        confusion = confusion / confusion.sum(dim=1)
        return (confusion.sum() - confusion.trace()) / num_classes
