"""The epochs of a run: the linear probe (epoch 0), the frozen stage, then the unfrozen one.

Each epoch ends with an atomic resume state holding everything the next epoch depends on (weights,
optimizer, step counters, early-stopping state, history); per-epoch reseeding makes data order and
augmentation a function of (seed, epoch), so a resumed run continues exactly where it stopped.
The frozen stage trains the head on cached backbone features where it can (feature_cache.py).
Under DDP every process runs the same epochs on its share of each batch and gets the same
metrics (distributed.py); rank 0 alone writes checkpoints and metrics.csv.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch.utils.data import BatchSampler

from visiontune.config import LEGACY_DEFAULTS, TrainConfig
from visiontune.errors import UserError
from visiontune.runformat import CONFIG_FILE, METRICS_FILE, STATE_FILE
from visiontune.training.callbacks import EarlyStopping
from visiontune.training.checkpoint import load_state, save_model, save_state
from visiontune.training.failures import passed_through
from visiontune.training.feature_cache import FeatureSet, PooledHead
from visiontune.training.history import write_metrics_csv
from visiontune.training.loop import EpochResult, evaluate, train_one_epoch
from visiontune.training.progress import EpochProgress
from visiontune.training.schedules import lr_factor
from visiontune.training.setup import TrainingSetup


class Callback(Protocol):
    """Called after each epoch's checkpoint is written (the linear probe is epoch 0); `record` is its metrics row.

    `trainer.setup` holds the model, optimizer and loaders as they are at that point.
    """

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None: ...


@dataclass
class TrainingOutcome:
    """What the epochs leave for finalize.py."""

    history: list[dict]  # one metrics row per epoch, the probe's first
    timings: dict
    best_epoch: int | None  # 0: the linear probe; None: the monitor was never finite
    probe_choice: dict  # the probe's chosen regularisation and its candidates; empty without a probe


def load_run_config(run_dir: Path) -> TrainConfig:
    """The config of a run directory, read without its resume state (how to launch its resume:
    read before its lock is taken, so it must not judge the state that the lock protects)."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a visiontune run directory (no config.yaml)")
    return TrainConfig.from_yaml(run_dir / CONFIG_FILE, missing=LEGACY_DEFAULTS)


def load_resume(run_dir: Path) -> tuple[TrainConfig, dict]:
    """The config and resume state of an interrupted run; a UserError says why it cannot resume."""
    state_path = run_dir / STATE_FILE
    config = load_run_config(run_dir)
    if not state_path.is_file():
        raise UserError(
            f"{run_dir} has no completed epoch to resume from; start it again with the same --out"
        )
    state = load_state(state_path)
    if state.get("finished"):
        raise UserError(f"{run_dir} has already finished; see {run_dir / 'summary.json'}")
    return config, state


class Trainer:
    """Runs the epochs of a set-up run, checkpointing each; `state` (a resume state) continues one."""

    def __init__(
        self, setup: TrainingSetup, run_dir: Path, callbacks: Sequence[Callback] = (), progress: bool = True,
        state: dict | None = None,
    ) -> None:
        self.setup, self.run_dir, self.callbacks, self.progress = setup, run_dir, list(callbacks), progress
        self.writes = setup.fabric.is_global_zero  # rank 0 writes the run directory, the others nothing
        self.state = state
        self.probe_choice: dict = (state or {}).get("probe_choice", {})  # the probe's C and candidates
        self.stopper = EarlyStopping(setup.cfg.monitor, setup.cfg.patience)
        if state is not None:
            try:
                setup.model.load_state_dict(state["model"])
                setup.optimizer.load_state_dict(state["optimizer"])
                self.stopper.load_state_dict(state["early_stopping"])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise UserError(f"{run_dir / STATE_FILE} does not fit this run (edited, or copied from "
                                f"another?): {str(exc).strip()[:200]}") from None

    def train(self) -> TrainingOutcome:
        """The probe (unless resumed), then the epochs left, until the last or early stopping."""
        setup, cfg = self.setup, self.setup.cfg
        state = self.state or {}
        history: list[dict] = list(state.get("history", []))
        timings = dict(state.get("timings", {"scan_s": setup.scan_s, "epochs_s": []}))
        start_epoch = state.get("epoch", 0)
        if history:
            setup.console.print(f"resuming {self.run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")
        if cfg.use_probe and not history:  # a resumed run has had its probe (or was started without)
            record = self._probe_stage(timings)
            if record is not None:
                history.append(record)
                self._save_epoch(-1, history, timings)
                setup.console.print(_epoch_line(record, cfg.epochs, True), markup=False)
                self._notify(record)
        cached: tuple[FeatureSet, FeatureSet] | None = None
        if setup.cached_views and start_epoch < cfg.freeze_epochs:
            t0 = time.perf_counter()
            with setup.console.status(f"computing frozen-backbone features ({setup.cached_views} view(s))"):
                cached = setup.extract_cached()
            timings["feature_cache_s"] = time.perf_counter() - t0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            stage, _, _ = setup.stage_of(epoch)
            if stage != "frozen":
                cached = None
            setup.prepare_epoch(epoch, same_on_every_rank=cached is not None)
            with EpochProgress(f"epoch {epoch + 1}/{cfg.epochs} {stage}", len(setup.train_loader), self.progress) as bar:
                if cached:
                    train, val = self._cached_epoch(epoch, *cached, on_batch=bar.update)
                else:
                    train = train_one_epoch(
                        setup.fabric, setup.module, setup.train_loader, setup.loss_fn, setup.optimizer,
                        lambda batch: self._set_lr(epoch, batch), on_batch=bar.update, sharded=True,
                    )
            train_seconds = time.perf_counter() - t0
            if not cached:
                val = evaluate(setup.fabric, setup.module, setup.eval_loaders["val"], setup.eval_loss_fn, len(setup.labels))
            seconds = time.perf_counter() - t0
            record = _epoch_record(epoch, stage, setup.optimizer.param_groups, train, val, seconds, train_seconds)
            history.append(record)
            timings["epochs_s"].append(seconds)
            if self.stopper.update(epoch + 1, record[cfg.monitor], loss=record["val_loss"]) and self.writes:
                save_model(self.run_dir / "checkpoints/best.safetensors", setup.model, setup.metadata)
            self._save_epoch(epoch, history, timings)
            setup.console.print(_epoch_line(record, cfg.epochs, self.stopper.best_epoch == epoch + 1), markup=False)
            self._notify(record)
            if self.stopper.should_stop:
                setup.console.print(f"early stopping: no {cfg.monitor} improvement for {cfg.patience} epochs")
                break
        return TrainingOutcome(history, timings, self.stopper.best_epoch, self.probe_choice)

    def _set_lr(self, epoch: int, batch: int) -> None:
        cfg = self.setup.cfg
        stage, first, n_epochs = self.setup.stage_of(epoch)
        steps = len(self.setup.train_loader)
        factor = lr_factor(
            cfg.schedule, (epoch - first) * steps + batch, n_epochs * steps, cfg.pct_start,
            warmup_fraction=cfg.warmup_fraction if stage == "unfrozen" else 0.0,
        )
        for group in self.setup.optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor

    def _notify(self, record: dict) -> None:
        for callback in self.callbacks:
            with passed_through():  # a callback stops a run on purpose (pruning): its exception stands
                callback.on_epoch_end(self, record)

    def _probe_stage(self, timings: dict) -> dict | None:
        """Epoch 0: the head fitted as a logistic-regression probe on frozen features (LP-FT).

        Its regularisation is chosen on validation by the monitored metric; it is recorded and
        checkpointed like an epoch, so the best-on-validation rule keeps it when fine-tuning
        never beats it. None (with a warning) when the head is not one linear layer.
        """
        setup = self.setup
        t0 = time.perf_counter()
        fitted = setup.fit_probe_head()
        if fitted is None:
            return None
        train_set, val_set, chosen, table = fitted
        n_classes = len(setup.labels)
        head = PooledHead(setup.model)
        train, val = (evaluate(setup.fabric, head, self._in_order(features), setup.eval_loss_fn, n_classes)
                      for features in (train_set, val_set))
        seconds = time.perf_counter() - t0
        timings["probe_s"] = seconds
        self.probe_choice = {"chosen": chosen, "candidates": table}
        record = _epoch_record(-1, "probe", setup.optimizer.param_groups, train, val, seconds, seconds)
        record["lr"] = record["backbone_lr"] = 0.0
        self.stopper.update(0, record[setup.cfg.monitor], loss=record["val_loss"])
        if self.writes:
            save_model(self.run_dir / "checkpoints/best.safetensors", setup.model, setup.metadata)
        return record

    def _cached_epoch(self, epoch: int, train_set: FeatureSet, val_set: FeatureSet, on_batch) -> tuple:
        """One frozen epoch on cached features: same batches, lrs and steps as the backbone path.

        Every process holds the whole cache and trains the head on whole batches alike (no
        gradients exchanged), so the heads stay equal and match a single process's.
        """
        setup = self.setup
        head, device, bs = PooledHead(setup.model), setup.fabric.device, setup.cfg.batch_size
        head.train()
        batches = train_set.batches(BatchSampler(setup.sampler, bs, setup.drop_last), epoch % setup.cached_views, device)
        train = train_one_epoch(
            setup.fabric, head, batches, setup.loss_fn, setup.optimizer, lambda batch: self._set_lr(epoch, batch),
            on_batch=on_batch,
        )
        return train, evaluate(setup.fabric, head, self._in_order(val_set), setup.eval_loss_fn, len(setup.labels))

    def _in_order(self, features: FeatureSet):
        """Evaluation batches of the first view of cached features."""
        return features.batches(BatchSampler(range(len(features.targets)), self.setup.eval_batch_size, False), 0,
                                self.setup.fabric.device)

    def _save_epoch(self, epoch: int, history: list[dict], timings: dict) -> None:
        setup = self.setup
        if not self.writes:
            return
        save_model(self.run_dir / "checkpoints/last.safetensors", setup.model, setup.metadata)
        write_metrics_csv(history, self.run_dir / METRICS_FILE)
        save_state(
            self.run_dir / STATE_FILE,
            {
                "epoch": epoch + 1,
                "model": setup.model.state_dict(),
                "optimizer": setup.optimizer.state_dict(),
                "early_stopping": self.stopper.state_dict(),
                "history": history,
                "timings": timings,
                "probe_choice": self.probe_choice,
                "finished": False,
            },
        )


def _epoch_record(
    epoch: int, stage: str, groups: list[dict], train: EpochResult, val: EpochResult, seconds: float, train_seconds: float,
) -> dict:
    lrs = {g["name"]: g["lr"] for g in groups}
    return {
        "epoch": epoch + 1,
        "stage": stage,
        "lr": lrs.get("head", lrs.get("head_no_decay", math.nan)),
        "backbone_lr": lrs.get("backbone", lrs.get("backbone_no_decay", math.nan)),
        "train_loss": train.loss,
        "train_accuracy": train.accuracy,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "val_f1_macro": val.f1_macro,
        "seconds": seconds,
        "train_seconds": train_seconds,  # without validation; the cached stage includes its val pass
    }


def _epoch_line(record: dict, epochs: int, best: bool) -> str:
    return (
        f"epoch {record['epoch']}/{epochs} [{record['stage']}] train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
        f"acc {record['val_accuracy']:.3f} f1 {record['val_f1_macro']:.3f} | {record['seconds']:.1f}s"
        + ("  [best]" if best else "")
    )
