"""One training epoch and one evaluation pass on Lightning Fabric: the whole inner loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from lightning.fabric import Fabric
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader

from visiontune.models.losses import ClassificationLoss


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    f1_macro: float | None = None
    steps: int = 0


def train_one_epoch(
    fabric: Fabric,
    model: nn.Module,
    loader: DataLoader,
    loss_fn: ClassificationLoss,
    optimizer: torch.optim.Optimizer,
    set_lr: Callable[[int], None],
    on_batch: Callable[[float, float], None] | None = None,
) -> EpochResult:
    """Train over `loader`; `set_lr(batch_index)` runs before every step (schedules are per step)."""
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for index, batch in enumerate(loader):
        if batch is None:  # every image of the batch failed to decode
            continue
        images, targets = batch
        set_lr(index)
        logits = model(images)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        steps += 1
        n = targets.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(dim=1) == targets).sum().item()
        seen += n
        if on_batch:
            on_batch(total_loss / seen, correct / seen)
    return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1), steps=steps)


@torch.inference_mode()
def evaluate(
    fabric: Fabric, model: nn.Module, loader: DataLoader, loss_fn: ClassificationLoss, num_classes: int
) -> EpochResult:
    """Loss, accuracy and macro-F1 (scikit-learn's definition) over `loader`, without augmentation."""
    was_training = model.training
    model.eval()
    total_loss, preds, targets_all = 0.0, [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        logits = model(images)
        total_loss += loss_fn(logits, targets).item() * targets.shape[0]
        preds.append(logits.argmax(dim=1).cpu())
        targets_all.append(targets.cpu())
    model.train(was_training)
    if not preds:
        return EpochResult(float("nan"), float("nan"), float("nan"))
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets_all).numpy()
    f1 = f1_score(y_true, y_pred, labels=np.arange(num_classes), average="macro", zero_division=0)
    return EpochResult(total_loss / len(y_true), float((y_pred == y_true).mean()), float(f1))
