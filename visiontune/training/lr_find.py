"""The learning-rate range test: train briefly with an exponentially growing lr, watch the loss.

It runs on a fresh model built exactly as training's first stage would be (same backbone, weights,
preprocessing, augmentation, sampler, loss, parameter groups and freezing; a frozen stage that
trains from cached backbone features does so here too), so the lr it finds is the value to pass as
`--lr`: the head lr, with the backbone at lr / lr_mult when it trains. The
suggestion is the steepest descent of the smoothed loss, as Lightning's `Tuner.lr_find` suggests;
the minimum-loss lr / 10 (fastai's older rule) is reported beside it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import nn
from torch.utils.data import BatchSampler

from visiontune.config import TrainConfig, config_for
from visiontune.errors import UserError
from visiontune.io import atomic_write, write_text_atomic
from visiontune.locking import locked_dir
from visiontune.models.losses import ClassificationLoss
from visiontune.training.feature_cache import PooledHead
from visiontune.training.setup import TrainingSetup, build_setup

SMOOTHING = 0.98  # EMA factor of the loss at 100+ steps, bias-corrected (Lightning's and fastai's)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its best value
MIN_POINTS = 5


@dataclass
class LrFindResult:
    lrs: list[float]  # head lr at each step
    losses: list[float]  # smoothed training loss at each step
    raw_losses: list[float]
    suggestion: float  # steepest descent of the smoothed loss
    min_loss_lr: float  # lr at the lowest smoothed loss, divided by 10
    stage: str  # "frozen" (backbone frozen, head lr) or "unfrozen" (head lr, backbone at lr / lr_mult)
    model: str
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["plot"] = str(self.plot) if self.plot else None
        return values

    def save(self, out_dir: Path) -> None:
        """lr_find.png and lr_find.json in `out_dir`."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.plot = out_dir / "lr_find.png"
        plot_lr_find(self, self.plot)
        write_text_atomic(out_dir / "lr_find.json", json.dumps(self.to_dict(), indent=2))


def lr_find(
    data: str | os.PathLike | None = None,
    *,
    config: TrainConfig | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    stage: str | None = None,
    **options: Any,
) -> LrFindResult:
    """Run the range test on `data` with training options (TrainConfig fields, as for `fit`).

    `stage` is the stage whose lr is tested: "frozen" (the head on a frozen backbone) or "unfrozen"
    (everything, the backbone at lr / lr_mult, starting from the linear-probe head as training
    does); default: the first stage training runs.
    Batches cycle when the training split has fewer than `steps` of them. With `out`, writes
    lr_find.png and lr_find.json there. The model used is thrown away: nothing else changes.
    """
    cfg = config_for(data, config, options)
    if not 0 < start_lr < end_lr:
        raise UserError(f"the lr range must satisfy 0 < start_lr < end_lr (got {start_lr} and {end_lr})")
    if steps < MIN_POINTS * 2:
        raise UserError(f"the lr range test needs at least {MIN_POINTS * 2} steps, not {steps}")
    if stage not in (None, "frozen", "unfrozen"):
        raise UserError(f"--stage must be frozen or unfrozen, not {stage!r}")
    if stage == "frozen" and cfg.freeze_epochs == 0:
        raise UserError("there is no frozen stage to test (--freeze-epochs 0); use --stage unfrozen or set --freeze-epochs")
    result = range_test(build_setup(cfg, Console(quiet=True)), start_lr, end_lr, steps, progress, stage)
    if out is not None:
        with locked_dir(out):  # re-entrant: `train --lr auto` already holds its run directory
            result.save(Path(out))
    return result


def resolve_auto_lr(cfg: TrainConfig, run_dir: Path, console: Console) -> LrFindResult:
    """`--lr auto`: run the range test, keep its plot in the run directory, set `cfg.lr` to the number.

    The test is on the unfrozen stage when training has one: its lr is the one that can wreck
    pretrained features, while a probe (or a frozen stage) converges over a wide range of lrs.
    """
    stage = "unfrozen" if cfg.epochs > cfg.freeze_epochs else "frozen"
    result = lr_find(config=cfg, progress=not console.quiet, out=run_dir, stage=stage)
    cfg.lr = result.suggestion
    console.print(
        f"lr auto: {result.suggestion:.3g} (steepest descent of the lr range test; min loss / 10 would be "
        f"{result.min_loss_lr:.3g}); plot: {result.plot}"
    )
    return result


def default_out_dir(model: str) -> Path:
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-lr-find-{model.replace('/', '_')}"


def range_test(setup: TrainingSetup, start_lr: float, end_lr: float, steps: int, progress: bool,
               stage: str | None) -> LrFindResult:
    """The sweep on a throw-away setup, brought to the state of training's first epoch of `stage`."""
    cfg = setup.cfg
    if not setup.train_ds.samples:
        raise UserError("the lr range test needs training images")
    first_epoch = cfg.freeze_epochs if stage == "unfrozen" else 0
    if cfg.use_probe and setup.stage_of(first_epoch)[0] == "unfrozen":
        setup.fit_probe_head()  # training's unfrozen stage starts from the probe head
    setup.prepare_epoch(first_epoch)  # seeds, train mode and the stage's freezing
    stage = setup.stage_of(first_epoch)[0]
    device, batch_size = setup.fabric.device, cfg.batch_size
    if stage == "frozen" and setup.cached_views:
        train_set, _ = setup.extract_cached(val=False)  # as training's frozen stage: features computed once
        forward = PooledHead(setup.model).train()
        index_batches = BatchSampler(setup.sampler, batch_size, setup.drop_last)
        batches = _cycle(lambda n: train_set.batches(iter(index_batches), n % setup.cached_views, device))
    else:
        forward, batches = setup.module, _cycle(lambda n: setup.train_loader)
    lrs, raw, smoothed = _sweep(setup.fabric, forward, batches, setup.loss_fn, setup.optimizer, start_lr, end_lr,
                                steps, progress)
    result = _suggest(lrs, raw, smoothed, stage, cfg.model)
    if forward is not setup.module:
        result.notes.append(f"the head trained on cached backbone features ({setup.cached_views} view(s)), as in training")
    return result


def _sweep(
    fabric: Fabric, forward: nn.Module, batches: Iterator, loss_fn: ClassificationLoss,
    optimizer: torch.optim.Optimizer, start_lr: float, end_lr: float, steps: int, progress: bool,
) -> tuple[list[float], list[float], list[float]]:
    """One optimizer step per lr, lr growing geometrically; stops when the smoothed loss diverges."""
    gamma = (end_lr / start_lr) ** (1 / (steps - 1))
    beta = min(SMOOTHING, 1 - 2 / steps)  # a shorter sweep gets a shorter window, so less lag
    lrs, raw, smoothed, best, average = [], [], [], math.inf, 0.0
    columns = (TextColumn("lr range test"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"))
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("", total=steps, stats="")
        for step in range(steps):
            lr = start_lr * gamma**step
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            inputs, targets = next(batches)
            loss = loss_fn(forward(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                break
            average = beta * average + (1 - beta) * value
            current = average / (1 - beta ** (step + 1))
            lrs.append(lr)
            raw.append(value)
            smoothed.append(current)
            bar.update(task, advance=1, stats=f"lr {lr:.2e} loss {current:.4f}")
            if step > 0 and current > DIVERGED * best:
                break
            best = min(best, current)
    return lrs, raw, smoothed


def _cycle(passes: Callable[[int], Iterable]) -> Iterator:
    """Batches without end: pass n iterates `passes(n)` (a fresh shuffle, or cached view n mod views)."""
    for n in itertools.count():
        yielded = False
        for batch in passes(n):
            if batch is not None:
                yielded = True
                yield batch
        if not yielded:
            raise UserError("no training image could be decoded")


def _suggest(lrs: list[float], raw: list[float], smoothed: list[float], stage: str, model: str) -> LrFindResult:
    """Steepest descent of the smoothed loss, skipping the first tenth and the last point (Lightning)."""
    if len(smoothed) < MIN_POINTS:
        raise UserError(
            f"the lr range test stopped after {len(smoothed)} step(s) (the loss diverged at once); "
            "lower the start of the range or choose --lr yourself"
        )
    skip_begin = len(smoothed) // 10
    window = np.asarray(smoothed[skip_begin:-1])
    steepest = skip_begin + int(np.argmin(np.gradient(window)))
    lowest = int(np.argmin(smoothed))
    notes = [f"the lr is the head lr of the {stage} stage" + (" (backbone at lr / lr_mult)" if stage == "unfrozen" else "")]
    return LrFindResult(lrs, smoothed, raw, lrs[steepest], lrs[lowest] / 10, stage, model, notes=notes)


def plot_lr_find(result: LrFindResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.raw_losses, color="lightgrey", linewidth=1, label="loss per step")
    ax.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
    at = result.lrs.index(result.suggestion)
    ax.plot(result.suggestion, result.losses[at], "o", color="C3", markersize=9,
            label=f"suggestion (steepest): {result.suggestion:.2e}")
    ax.axvline(result.min_loss_lr, color="C2", linestyle="--", label=f"min loss / 10: {result.min_loss_lr:.2e}")
    ax.set(xscale="log", xlabel=f"head learning rate ({result.stage} stage)", ylabel="training loss",
           title=f"lr range test: {result.model}")
    top = max(result.losses[: max(1, len(result.losses) - 1)])
    ax.set_ylim(min(result.raw_losses) * 0.95, top * 1.3)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
