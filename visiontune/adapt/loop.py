"""The epochs of mcc, finetune and mixed on Lightning Fabric, each scored, and the rule that keeps one.

Every epoch (and epoch 0, the source model as it came) is scored on what adaptation may look at:
source validation accuracy, the mean prediction entropy of held-out unlabelled target images, and
the accuracy on labelled target validation images when there are any. Target test images are
never loaded, so no choice can depend on them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from lightning.fabric import Fabric
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from visiontune.adapt.batchnorm import batch_norms
from visiontune.adapt.mcc import MinimumClassConfusionLoss, prediction_entropy
from visiontune.errors import UserError
from visiontune.models.losses import ClassificationLoss
from visiontune.training.loop import evaluate
from visiontune.training.schedules import lr_factor

SOURCE_VAL_TOLERANCE = 0.02  # epochs this close to the best source val accuracy compete on target entropy


@dataclass
class EpochScorer:
    """The per-epoch numbers; loaders are Fabric's (batches arrive on the device)."""

    fabric: Fabric
    network: nn.Module
    loss_fn: ClassificationLoss
    num_classes: int
    held_out: DataLoader  # unlabelled target images (ImageFiles batches)
    source_val: DataLoader | None
    target_val: DataLoader | None

    def score(self) -> dict:
        def accuracy(loader: DataLoader | None) -> float | None:
            if loader is None:
                return None
            result = evaluate(self.fabric, self.network, loader, self.loss_fn, self.num_classes).accuracy
            return None if math.isnan(result) else result

        return {"source_val_accuracy": accuracy(self.source_val),
                "target_entropy": mean_entropy(self.network, self.held_out, self.loss_fn),
                "target_val_accuracy": accuracy(self.target_val)}


@dataclass
class TrainingPlan:
    """What one method trains on: labelled batches, and for mcc unlabelled target batches too."""

    labelled: DataLoader  # (images, targets) batches, None for a batch of unreadable files
    unlabelled: DataLoader | None = None  # ImageFiles batches of target images (mcc)
    trade_off: float = 1.0
    temperature: float = 2.5
    batch_norm_statistics: str = "batch"  # "inference": BatchNorms stay in eval mode (few-shot batches)


@torch.inference_mode()
def mean_entropy(network: nn.Module, loader: DataLoader, loss_fn: ClassificationLoss) -> float | None:
    """Mean entropy of the predicted class probabilities over `loader`'s images (None without any)."""
    was_training = network.training
    network.eval()
    total, seen = 0.0, 0
    for images, _, _ in loader:
        if images is None:
            continue
        probabilities = loss_fn.probabilities(network(images).float())
        total += prediction_entropy(probabilities).sum().item()
        seen += images.shape[0]
    network.train(was_training)
    return total / seen if seen else None


def run_epochs(
    fabric: Fabric, network: nn.Module, optimizer: torch.optim.Optimizer, plan: TrainingPlan, loss_fn: ClassificationLoss,
    scorer: EpochScorer, epochs: int, lr: float, save: Callable[[int], None], console: Console,
) -> list[dict]:
    """Score the source model (epoch 0), then train and score `epochs` epochs, saving each via `save(epoch)`."""
    t0 = time.perf_counter()
    records = [{"epoch": 0, "train_loss": None, "mcc_loss": None, **scorer.score(), "seconds": time.perf_counter() - t0}]
    save(0)
    console.print(_line(records[0], epochs), markup=False)
    mcc = MinimumClassConfusionLoss(plan.temperature) if plan.unlabelled is not None else None
    target_batches = endless(plan.unlabelled) if plan.unlabelled is not None else None
    steps = len(plan.labelled)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        network.train()
        if plan.batch_norm_statistics == "inference":
            for norm in batch_norms(network):
                norm.eval()

        def set_lr(batch: int, epoch: int = epoch) -> None:
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor("cosine", (epoch - 1) * steps + batch, epochs * steps)

        losses = train_epoch(fabric, network, optimizer, plan.labelled, loss_fn, set_lr, target_batches, mcc,
                             plan.trade_off)
        records.append({"epoch": epoch, **losses, **scorer.score(), "seconds": time.perf_counter() - t0})
        save(epoch)
        console.print(_line(records[-1], epochs), markup=False)
    return records


def train_epoch(
    fabric: Fabric, network: nn.Module, optimizer: torch.optim.Optimizer, labelled: DataLoader,
    loss_fn: ClassificationLoss, set_lr: Callable[[int], None], target_batches: Iterator[torch.Tensor] | None = None,
    mcc: MinimumClassConfusionLoss | None = None, trade_off: float = 1.0,
) -> dict:
    """One pass over `labelled`; with `mcc`, each step adds trade_off x MCC on the next target batch,
    forwarded together with the labelled one (as tllib does, so BatchNorm sees both domains)."""
    total, total_mcc, seen, steps = 0.0, 0.0, 0, 0
    for index, batch in enumerate(labelled):
        if batch is None:  # every image of the batch failed to decode
            continue
        images, targets = batch
        set_lr(index)
        n = targets.shape[0]
        if mcc is not None:
            logits = network(torch.cat([images, next(target_batches)]))
            transfer = mcc(logits[n:])
            loss = loss_fn(logits[:n], targets) + trade_off * transfer
            total_mcc += transfer.item() * n
        else:
            loss = loss_fn(network(images), targets)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        total += loss.item() * n
        seen += n
        steps += 1
    if not steps:
        raise UserError("no labelled training image could be read in this epoch (moved or deleted since the run?)")
    return {"train_loss": total / seen, "mcc_loss": total_mcc / seen if mcc is not None else None}


def endless(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Target image batches without end, the loader reshuffling on every pass."""
    while True:
        found = False
        for images, _, _ in loader:
            if images is not None:
                found = True
                yield images
        if not found:
            raise UserError("none of the target images could be read any more (moved or deleted during adaptation?)")


def choose_epoch(records: list[dict], trained_on_target_labels: bool,
                 tolerance: float = SOURCE_VAL_TOLERANCE) -> tuple[int, str]:
    """The index of the record to keep and the criterion that chose it.

    With labelled target validation images: the best target val accuracy over every epoch, the
    source model's included (ties: lower target entropy). Otherwise only trained epochs compete
    (the source model is typically confident on the new domain, and entropy alone would keep it):
    finetune / mixed keep the last epoch of their fixed schedule, as no label they did not train
    on is left to choose with; mcc, which uses no target label, keeps among epochs within
    `tolerance` of the best source val accuracy the one with the lowest mean prediction entropy on
    held-out target images.
    """
    entropy = lambda i: records[i]["target_entropy"] if records[i]["target_entropy"] is not None else math.inf
    if all(r["target_val_accuracy"] is not None for r in records):
        best = max(range(len(records)), key=lambda i: (records[i]["target_val_accuracy"], -entropy(i)))
        return best, "target_val_accuracy (labelled target validation images), ties to lower target entropy"
    if trained_on_target_labels:
        return len(records) - 1, "the last epoch (no labelled target validation images to choose with)"
    trained = range(1, len(records))
    scored = [i for i in trained if records[i]["source_val_accuracy"] is not None]
    if not scored:
        return min(trained, key=entropy), "lowest target_entropy on held-out unlabelled target images (no source val images)"
    top = max(records[i]["source_val_accuracy"] for i in scored)
    candidates = [i for i in scored if records[i]["source_val_accuracy"] >= top - tolerance]
    return min(candidates, key=entropy), (f"lowest target_entropy on held-out unlabelled target images among trained "
                                          f"epochs within {tolerance} of their best source_val_accuracy")


def _line(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}" + (" (source model)" if record["epoch"] == 0 else "")]
    for key in ("train_loss", "mcc_loss", "source_val_accuracy", "target_entropy", "target_val_accuracy"):
        if record[key] is not None:
            parts.append(f"{key} {record[key]:.4f}")
    return " | ".join(parts) + f" | {record['seconds']:.1f}s"
