"""One training epoch and one evaluation pass on Lightning Fabric: the whole inner loop.

Loss sums and correct counts stay on the device and are read once per epoch (and every
`PROGRESS_EVERY` steps for a progress bar): a `.item()` per step would make the host wait for
each step on a GPU. Sums are float64, as the Python floats they replace, so the numbers are the
same. Under DDP a loader's batches are this process's shares (distributed.py), and the epoch's
sums are added up across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from lightning.fabric import Fabric
from sklearn.metrics import f1_score
from torch import nn

from visiontune.models.losses import ClassificationLoss
from visiontune.training.distributed import Indexed, first_of_each, gather_rows, sum_across

PROGRESS_EVERY = 25  # steps between the running loss / accuracy a progress bar shows (one host sync each)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    f1_macro: float | None = None
    steps: int = 0


def train_one_epoch(
    fabric: Fabric,
    model: nn.Module,
    loader: Iterable,
    loss_fn: ClassificationLoss,
    optimizer: torch.optim.Optimizer,
    set_lr: Callable[[int], None],
    on_batch: Callable[[tuple[float, float] | None], None] | None = None,
    sharded: bool = False,
) -> EpochResult:
    """Train over `loader`; `set_lr(batch_index)` runs before every step (schedules are per step).

    `on_batch` is called after every step, every `PROGRESS_EVERY` steps with the running (loss,
    accuracy), else with None. `sharded`: the batches are this process's shares of the global
    batches, and the epoch's loss and accuracy are those of all processes together.
    """
    sums = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # loss * n, correct
    steps = seen = 0  # batch sizes are known on the host: no device-to-host copy for them
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
        seen += n
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * n, (logits.argmax(dim=1) == targets).sum().double()])
        if on_batch:
            on_batch(_running(sums, seen) if steps % PROGRESS_EVERY == 0 else None)
    if sharded:
        totals = torch.cat([sums, sums.new_tensor([seen])])
        total_loss, correct, seen = sum_across(fabric, totals).tolist()
    else:
        total_loss, correct = sums.tolist()
    return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1), steps=steps)


def _running(sums: torch.Tensor, seen: int) -> tuple[float, float]:
    total_loss, correct = sums.tolist()
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.inference_mode()
def evaluate(
    fabric: Fabric, model: nn.Module, loader: Iterable, loss_fn: ClassificationLoss, num_classes: int
) -> EpochResult:
    """Loss, accuracy and macro-F1 (scikit-learn's definition) over `loader`, without augmentation.

    A loader of an `Indexed` dataset is this process's share of a sharded one (distributed.py): the
    shares of all processes are joined, each sample counted once, and every process gets the
    metrics of the whole set.
    """
    was_training = model.training
    model.eval()
    sharded = isinstance(getattr(loader, "dataset", None), Indexed)
    total_loss = torch.zeros((), dtype=torch.float64, device=fabric.device)
    preds, targets_all, rows = [], [], []
    for batch in loader:
        if batch is None:
            continue
        images, targets, *indices = batch
        logits = model(images)
        if sharded:  # one row per sample: index, prediction, target, loss
            per_sample = loss_fn.per_sample(logits, targets).double()
            columns = (indices[0].double(), logits.argmax(dim=1).double(), targets.double(), per_sample)
            rows.append(torch.stack(columns, dim=1))
        else:
            total_loss += loss_fn(logits, targets).double() * targets.shape[0]
            preds.append(logits.argmax(dim=1))
            targets_all.append(targets)
    model.train(was_training)
    if sharded:  # every rank joins, also one whose share was all unreadable
        return _joined_result(fabric, rows, num_classes)
    if not preds:
        return EpochResult(float("nan"), float("nan"), float("nan"))
    y_pred, y_true = torch.cat(preds).cpu().numpy(), torch.cat(targets_all).cpu().numpy()
    return _result(total_loss.item() / len(y_true), y_pred, y_true, num_classes)


def _joined_result(fabric: Fabric, rows: list[torch.Tensor], num_classes: int) -> EpochResult:
    local = torch.cat(rows) if rows else torch.zeros((0, 4), dtype=torch.float64, device=fabric.device)
    joined = gather_rows(fabric, local)
    joined = joined[first_of_each(joined[:, 0].long())].cpu()
    if not len(joined):
        return EpochResult(float("nan"), float("nan"), float("nan"))
    y_pred, y_true = joined[:, 1].long().numpy(), joined[:, 2].long().numpy()
    return _result(float(joined[:, 3].sum()) / len(joined), y_pred, y_true, num_classes)


def _result(loss: float, y_pred: np.ndarray, y_true: np.ndarray, num_classes: int) -> EpochResult:
    f1 = f1_score(y_true, y_pred, labels=np.arange(num_classes), average="macro", zero_division=0)
    return EpochResult(loss, float((y_pred == y_true).mean()), float(f1))
