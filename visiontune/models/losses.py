"""Classification losses with optional per-class weights, all reduced the same way.

Each loss gives a per-sample value; class weights multiply it by the weight of the sample's class
and the batch loss is their weighted mean (as `F.cross_entropy(weight=...)` does), so `--balance
weights` means the same thing for every loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

LOSSES = ("ce", "bce", "focal")


class ClassificationLoss(nn.Module):
    """ce: softmax cross-entropy (label smoothing); bce / focal: one-vs-rest sigmoid losses."""

    def __init__(
        self,
        kind: str = "ce",
        num_classes: int = 2,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; use one of {LOSSES}")
        self.kind, self.num_classes = kind, num_classes
        self.label_smoothing = label_smoothing
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = self.per_sample(logits, targets)
        if self.class_weights is None:
            return per_sample.mean()
        weights = self.class_weights[targets]
        return (per_sample * weights).sum() / weights.sum()

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each sample's loss, before class weights (evaluation adds them up across processes)."""
        logits = logits.float()
        if self.kind == "ce":
            return F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.label_smoothing)
        onehot = F.one_hot(targets, self.num_classes).to(logits.dtype)
        if self.kind == "bce":
            per_class = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        else:
            per_class = sigmoid_focal_loss(
                logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
            )
        return per_class.sum(dim=1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax for ce; for sigmoid losses, per-class sigmoids rescaled to sum to one."""
        if self.kind == "ce":
            return logits.float().softmax(dim=1)
        probs = logits.float().sigmoid()
        return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


def class_weights_for(counts: list[int]) -> torch.Tensor:
    """n / (C * n_c): the 'balanced' weights of scikit-learn."""
    counts_t = torch.tensor(counts, dtype=torch.float32).clamp_min(1)
    return counts_t.sum() / (len(counts) * counts_t)


def probabilities(logits: np.ndarray, loss: str, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities the way the run's loss defines them, after temperature scaling."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float32)) / temperature
    return ClassificationLoss(loss, num_classes=scaled.shape[1]).probabilities(scaled).numpy()
