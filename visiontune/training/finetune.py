"""The staged fine-tuning recipe: frozen backbone first, then everything with discriminative lrs.

`fit` builds a `FineTune` from a config (or from a run directory to resume) and runs it. Each epoch
ends with an atomic resume state holding everything the next epoch depends on (weights, optimizer,
step counters, early-stopping state, history); per-epoch reseeding makes data order and
augmentation a function of (seed, epoch), so a resumed run continues exactly where it stopped.
The frozen stage trains the head on cached backbone features where it can (feature_cache.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import lightning.fabric
import torch
from lightning.fabric import Fabric
from rich.console import Console
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    WeightedRandomSampler,
)

from visiontune._version import __version__
from visiontune.config import LEGACY_DEFAULTS, TrainConfig, config_for
from visiontune.data.cache import DecodedImageCache
from visiontune.data.dataset import ImageDataset, collate_skipping_none
from visiontune.data.samples import Sample, SampleSet
from visiontune.data.sources import discover
from visiontune.data.splits import write_splits_csv
from visiontune.data.transforms import Preprocessing
from visiontune.data.validate import ScanResult, check_samples, scan
from visiontune.devices import native_bf16_cpu, plan_cpu, resolve_device
from visiontune.errors import UserError
from visiontune.inference.engine import CPU_BATCH, CUDA_BATCH
from visiontune.io import write_text_atomic
from visiontune.locking import is_only_lock, locked_dir
from visiontune.models.backbones import check_weights_available, create_classifier
from visiontune.models.losses import ClassificationLoss, class_weights_for
from visiontune.models.param_groups import (
    apply_freezing,
    build_param_groups,
    fixed_parameter_names,
)
from visiontune.models.probe_heads import (
    PROBE_SCORES,
    load_linear_head,
    select_classifier,
)
from visiontune.run import Run
from visiontune.training.callbacks import EarlyStopping
from visiontune.training.checkpoint import load_state, save_model, save_state
from visiontune.training.failures import passed_through, stopped_run_error
from visiontune.training.feature_cache import (
    FeatureSet,
    PooledHead,
    extract_features,
    fits_in_memory,
)
from visiontune.training.history import plot_history, write_metrics_csv
from visiontune.training.loop import EpochResult, evaluate, train_one_epoch
from visiontune.training.progress import EpochProgress
from visiontune.training.schedules import lr_factor

log = logging.getLogger(__name__)
STATE_FILE = "checkpoints/state.pt"


class Callback(Protocol):
    """Called after each epoch's checkpoint is written (the linear probe is epoch 0); `record` is its metrics row."""

    def on_epoch_end(self, tuner: FineTune, record: dict) -> None: ...


def fit(
    data: str | os.PathLike | None = None,
    *,
    config: TrainConfig | None = None,
    resume: str | os.PathLike | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    **options: Any,
) -> Run:
    """Fine-tune a timm backbone on `data`; options are TrainConfig fields (the CLI flags).

    `resume=RUN_DIR` continues an interrupted run from its last completed epoch.
    """
    if resume is not None:
        with locked_dir(resume, create=False):  # one process per run directory (locking.py)
            return FineTune.resumed(Path(resume), callbacks, progress).run()
    cfg = config_for(data, config, options)
    with locked_dir(_run_dir_for(cfg)):
        tuner = FineTune(cfg, callbacks, progress)
        if cfg.lr == "auto":  # replaced by the number found, so config.yaml (and any resume) has it
            from visiontune.training.lr_find import resolve_auto_lr

            resolve_auto_lr(cfg, tuner.dir, tuner.console)
        return tuner.run()


class FineTune:
    def __init__(
        self, config: TrainConfig, callbacks: Sequence[Callback] = (), progress: bool = True,
        state: dict | None = None, run_dir: Path | None = None,
    ) -> None:
        self.cfg = config
        self.callbacks = list(callbacks)
        self.console = Console(quiet=not progress, highlight=False, soft_wrap=True)
        self.progress = progress
        self.state = state
        self.probe_choice: dict = (state or {}).get("probe_choice", {})  # the probe's C and candidates
        self.dir = run_dir or _new_run_dir(config)

    @classmethod
    def resumed(cls, run_dir: Path, callbacks: Sequence[Callback], progress: bool) -> FineTune:
        state_path = run_dir / STATE_FILE
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a visiontune run directory (no config.yaml)")
        if not state_path.is_file():
            raise UserError(
                f"{run_dir} has no completed epoch to resume from; start it again with the same --out"
            )
        state = load_state(state_path)
        if state.get("finished"):
            raise UserError(f"{run_dir} has already finished; see {run_dir / 'summary.json'}")
        config = TrainConfig.from_yaml(run_dir / "config.yaml", missing=LEGACY_DEFAULTS)
        return cls(config, callbacks, progress, state=state, run_dir=run_dir)

    # -- setup ------------------------------------------------------------------------------------

    def run(self) -> Run:
        started = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.setup()
        try:
            history, timings = self._train(self.scanned, self.scan_s)
            return self._finish(history, timings, self.scanned, started)
        except KeyboardInterrupt:
            self.console.print(f"interrupted; continue with: visiontune train --resume {self.dir}")
            raise
        except Exception as exc:  # a worker, a transform, a full disk: one line and the way on
            error = stopped_run_error(exc, self.dir, STATE_FILE)
            if error is None:
                raise
            raise error from exc

    def setup(self, write_files: bool = True) -> None:
        """Everything before the first epoch: data, model, loaders, optimizer (lr-find reuses it)."""
        cfg, resuming = self.cfg, self.state is not None
        self.fabric = _make_fabric(cfg.device)
        if self.fabric.device.type == "cpu":
            self.cpu = plan_cpu(cfg.threads, cfg.workers).apply()
            self.workers = self.cpu.workers
            log.info("CPU plan: %s", self.cpu.describe())
        else:
            self.workers = cfg.workers if cfg.workers is not None else min(8, (os.cpu_count() or 2) - 1)
        if not resuming:  # a missing download stops the run before any data is read
            check_weights_available(cfg.model, cfg.pretrained, cfg.weights)
        source = discover(self.dir / "splits.csv") if resuming else self._discover()
        t0 = time.perf_counter()
        self.scanned = scanned = self._scan(source)
        self.scan_s = time.perf_counter() - t0
        self.labels = sorted({s.label for s in scanned.readable})
        self._check_splits(scanned.readable)
        lightning.fabric.seed_everything(cfg.seed, verbose=False)
        self.model = create_classifier(
            cfg.model, len(self.labels), pretrained=cfg.pretrained and not resuming,
            weights=None if resuming else cfg.weights,
        )
        self.pre = Preprocessing.from_model(self.model, cfg.image_size, cfg.crop_mode)
        self.metadata = self._metadata()
        self.empty_classes = source.empty_classes
        self.data_checks = check_samples(source, cfg.max_pixels, scanned=scanned)
        for problem in self.data_checks.errors if not resuming else []:
            log.warning("data check: %s", problem)
        if write_files and not resuming:
            self._write_run_files(scanned)
        self._build_training(scanned.readable)

    def _discover(self) -> SampleSet:
        cfg = self.cfg
        source = discover(cfg.data, cfg.label_regex, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        for name in source.empty_classes:
            log.warning("class folder '%s' has no images and is left out", name)
        for note in source.notes:
            log.warning(note)
        return source

    def _scan(self, source: SampleSet) -> ScanResult:
        with self.console.status(f"checking {len(source.samples)} images"):
            scanned = scan(source.samples, self.cfg.max_pixels)
        for skipped in scanned.skipped:
            log.warning("skipping %s: %s", skipped.path, skipped.reason)
        return scanned

    def _check_splits(self, samples: list[Sample]) -> None:
        if len(self.labels) < 2:
            raise UserError(f"need at least 2 classes with readable images, found {self.labels}")
        for split in ("train", "val"):
            present = {s.label for s in samples if s.split == split}
            missing = [label for label in self.labels if label not in present]
            if missing:
                raise UserError(f"no readable {split} images for class(es): {', '.join(missing)}")

    def _metadata(self) -> dict:
        return {
            "format": 1,
            "visiontune_version": __version__,
            "model": self.cfg.model,
            "labels": self.labels,
            "preprocessing": self.pre.to_dict(),
            "loss": self.cfg.loss,
            "config": self.cfg.model_dump(),
        }

    def _write_run_files(self, scanned: ScanResult) -> None:
        self.cfg.to_yaml(self.dir / "config.yaml")
        write_splits_csv(scanned.readable, self.dir / "splits.csv")
        (self.dir / "labels.json").write_text(json.dumps(self.labels, indent=2))
        (self.dir / "model.json").write_text(json.dumps(self.metadata, indent=2))

    def _build_training(self, samples: list[Sample]) -> None:
        cfg, fabric = self.cfg, self.fabric
        index = {label: i for i, label in enumerate(self.labels)}
        by_split = {split: [s for s in samples if s.split == split] for split in ("train", "val", "test")}
        # With the decoded cache, loaders yield uint8 and the model's first step normalises on the device.
        cache = DecodedImageCache.for_preprocessing(self.pre) if cfg.decoded_cache else None
        float_in_loader = cache is None
        train_ds = ImageDataset(
            by_split["train"], index, self.pre.train_transform(cfg.augment, float_in_loader, cfg.crop_scale),
            cfg.max_pixels, cache,
        )
        counts = [train_ds.targets.count(i) for i in range(len(self.labels))]
        self.generator = torch.Generator()
        if cfg.balance == "sampler":
            sample_weights = [1.0 / counts[t] for t in train_ds.targets]
            sampler = WeightedRandomSampler(sample_weights, len(train_ds), replacement=True, generator=self.generator)
        else:
            sampler = RandomSampler(train_ds, generator=self.generator)
        common = dict(
            num_workers=self.workers, collate_fn=collate_skipping_none,
            persistent_workers=self.workers > 0, pin_memory=fabric.device.type == "cuda",
        )
        self.sampler, self.drop_last = sampler, len(train_ds) > cfg.batch_size
        self.train_loader = fabric.setup_dataloaders(
            DataLoader(train_ds, cfg.batch_size, sampler=sampler, drop_last=self.drop_last, **common)
        )
        eval_sets = {
            split: ImageDataset(items, index, self.pre.eval_transform(float_in_loader), cfg.max_pixels, cache)
            for split, items in by_split.items()
            if items and split != "train"
        }
        # inference batches: small on a CPU, where large ones fall out of cache (2x slower measured)
        self.eval_batch_size = CPU_BATCH if fabric.device.type == "cpu" else CUDA_BATCH
        self.eval_loaders = {
            split: fabric.setup_dataloaders(DataLoader(ds, self.eval_batch_size, **common))
            for split, ds in eval_sets.items()
        }
        self.train_ds, self.val_ds, self.loader_options = train_ds, eval_sets["val"], common
        # the probe sees training images as evaluation does: un-augmented
        self.train_eval_ds = ImageDataset(by_split["train"], index, self.pre.eval_transform(float_in_loader),
                                          cfg.max_pixels, cache)
        self.cached_views = self._cached_views(len(train_ds))
        weights = class_weights_for(counts) if cfg.balance == "weights" else None
        loss_args = dict(kind=cfg.loss, num_classes=len(self.labels), focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma)
        self.loss_fn = ClassificationLoss(class_weights=weights, label_smoothing=cfg.label_smoothing, **loss_args).to(fabric.device)
        self.eval_loss_fn = ClassificationLoss(**loss_args).to(fabric.device)

        self.fixed = fixed_parameter_names(self.model, cfg.unfreeze_from)
        # channels_last on CPU too: CNN training steps ran 2x faster here (docs/benchmarks.md)
        self.model = self.model.to(memory_format=torch.channels_last)
        groups = build_param_groups(self.model, cfg.weight_decay, cfg.lr_mult, self.fixed)
        optimizer = torch.optim.AdamW(groups, lr=0.0)  # set_lr sets every step's lr
        self.normalize = self.pre.normalizer()  # float batches pass through unchanged
        network = nn.Sequential(self.normalize, self.model)  # checkpoints save self.model alone
        self.module, self.optimizer = fabric.setup(torch.compile(network) if cfg.compile else network, optimizer)
        self.stopper = EarlyStopping(cfg.monitor, cfg.patience)
        if self.state is not None:
            try:
                self.model.load_state_dict(self.state["model"])
                self.optimizer.load_state_dict(self.state["optimizer"])
                self.stopper.load_state_dict(self.state["early_stopping"])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise UserError(f"{self.dir / STATE_FILE} does not fit this run (edited, or copied from "
                                f"another?): {str(exc).strip()[:200]}") from None

    def _cached_views(self, train_size: int) -> int:
        """Views of each training image the frozen stage trains on from cached features; 0 = no cache."""
        cfg = self.cfg
        if not cfg.feature_cache or cfg.freeze_epochs == 0:
            return 0
        views = cfg.feature_views or (1 if cfg.augment == "none" else min(cfg.freeze_epochs, 4))
        views = 1 if cfg.augment == "none" else views  # without augmentation every view is the same
        return views if fits_in_memory(self.model, train_size, views) else 0

    def extract_cached(self, val: bool = True, probe: bool = False) -> tuple[FeatureSet, FeatureSet | None]:
        """Frozen-backbone features of train and val (one un-augmented view).

        Train gets `cached_views` views through the training transform, or with `probe` one
        un-augmented view, as the linear probe is fitted.
        """
        options = {**self.loader_options, "persistent_workers": False}
        precision = self.cfg.feature_precision
        bf16 = precision == "bf16" or (precision == "auto" and self.fabric.device.type == "cpu" and native_bf16_cpu())
        args = (self.normalize, self.cfg.seed, self.eval_batch_size, options, bf16)
        train_ds, views = (self.train_eval_ds, 1) if probe else (self.train_ds, self.cached_views)
        return (
            extract_features(self.fabric, self.model, train_ds, views, *args),
            extract_features(self.fabric, self.model, self.val_ds, 1, *args) if val else None,
        )

    # -- training ---------------------------------------------------------------------------------

    def stage_of(self, epoch: int) -> tuple[str, int, int]:
        """(stage name, first epoch of the stage, epochs in the stage) for 0-based `epoch`."""
        cfg = self.cfg
        if epoch < cfg.freeze_epochs:
            return "frozen", 0, cfg.freeze_epochs
        return "unfrozen", cfg.freeze_epochs, cfg.epochs - cfg.freeze_epochs

    def prepare_epoch(self, epoch: int) -> None:
        """Reseed, set train mode and the stage's freezing; public so tests can inspect a stage."""
        stage, _, _ = self.stage_of(epoch)
        lightning.fabric.seed_everything(self.cfg.seed + epoch, verbose=False)
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + epoch)
        self.module.train()
        apply_freezing(self.model, stage == "frozen", self.cfg.train_bn, self.fixed, self.cfg.bn_statistics)

    def set_lr(self, epoch: int, batch: int) -> None:
        cfg = self.cfg
        stage, first, n_epochs = self.stage_of(epoch)
        steps = len(self.train_loader)
        factor = lr_factor(
            cfg.schedule, (epoch - first) * steps + batch, n_epochs * steps, cfg.pct_start,
            warmup_fraction=cfg.warmup_fraction if stage == "unfrozen" else 0.0,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor

    def _train(self, scanned: ScanResult, scan_s: float) -> tuple[list[dict], dict]:
        cfg = self.cfg
        state = self.state or {}
        history: list[dict] = list(state.get("history", []))
        timings = dict(state.get("timings", {"scan_s": scan_s, "epochs_s": []}))
        start_epoch = state.get("epoch", 0)
        if history:
            self.console.print(f"resuming {self.dir} at epoch {start_epoch + 1}/{cfg.epochs}")
        if self.cfg.use_probe and not history:  # a resumed run has had its probe (or was started without)
            record = self._probe_stage(timings)
            if record is not None:
                history.append(record)
                self._save_epoch(-1, history, timings)
                self.console.print(_epoch_line(record, cfg.epochs, True), markup=False)
                self._notify(record)
        cached: tuple[FeatureSet, FeatureSet] | None = None
        if self.cached_views and start_epoch < cfg.freeze_epochs:
            t0 = time.perf_counter()
            with self.console.status(f"computing frozen-backbone features ({self.cached_views} view(s))"):
                cached = self.extract_cached()
            timings["feature_cache_s"] = time.perf_counter() - t0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            stage, _, _ = self.stage_of(epoch)
            self.prepare_epoch(epoch)
            if stage != "frozen":
                cached = None
            with EpochProgress(f"epoch {epoch + 1}/{cfg.epochs} {stage}", len(self.train_loader), self.progress) as bar:
                if cached:
                    train, val = self._cached_epoch(epoch, *cached, on_batch=bar.update)
                else:
                    train = train_one_epoch(
                        self.fabric, self.module, self.train_loader, self.loss_fn, self.optimizer,
                        lambda batch: self.set_lr(epoch, batch), on_batch=bar.update,
                    )
            train_seconds = time.perf_counter() - t0
            if not cached:
                val = evaluate(self.fabric, self.module, self.eval_loaders["val"], self.eval_loss_fn, len(self.labels))
            seconds = time.perf_counter() - t0
            record = _epoch_record(epoch, stage, self.optimizer.param_groups, train, val, seconds, train_seconds)
            history.append(record)
            timings["epochs_s"].append(seconds)
            if self.stopper.update(epoch + 1, record[cfg.monitor], loss=record["val_loss"]):
                save_model(self.dir / "checkpoints/best.safetensors", self.model, self.metadata)
            self._save_epoch(epoch, history, timings)
            self.console.print(_epoch_line(record, cfg.epochs, self.stopper.best_epoch == epoch + 1), markup=False)
            self._notify(record)
            if self.stopper.should_stop:
                self.console.print(f"early stopping: no {cfg.monitor} improvement for {cfg.patience} epochs")
                break
        return history, timings

    def fit_probe_head(self) -> tuple[FeatureSet, FeatureSet, dict, list[dict]] | None:
        """Fit the head as a logistic-regression probe on frozen features, chosen on val by the monitor.

        Returns (train features, val features, chosen regularisation, candidates), or None with a
        warning when the head is not one linear layer or the features would not fit in memory.
        """
        classifier, n_classes = self.model.get_classifier(), len(self.labels)
        if not isinstance(classifier, nn.Linear):
            log.warning("no linear probe for this model's head (%s); the head starts untrained",
                        type(classifier).__name__)
            return None
        if not fits_in_memory(self.model, len(self.train_ds), 1):
            log.warning("no linear probe: its features would not fit in memory; the head starts untrained")
            return None
        with self.console.status("linear probe: computing frozen-backbone features"):
            train_set, val_set = self.extract_cached(probe=True)
        with self.console.status("linear probe: fitting the head"):
            pipeline, chosen, table = select_classifier(
                "logreg", train_set.arrays(), val_set.arrays(), n_classes, self.cfg.seed, PROBE_SCORES[self.cfg.monitor],
            )
            load_linear_head(classifier, pipeline, n_classes)
        return train_set, val_set, chosen, table

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
        t0 = time.perf_counter()
        fitted = self.fit_probe_head()
        if fitted is None:
            return None
        train_set, val_set, chosen, table = fitted
        n_classes = len(self.labels)
        head = PooledHead(self.model)
        train, val = (evaluate(self.fabric, head, self._in_order(features), self.eval_loss_fn, n_classes)
                      for features in (train_set, val_set))
        seconds = time.perf_counter() - t0
        timings["probe_s"] = seconds
        self.probe_choice = {"chosen": chosen, "candidates": table}
        record = _epoch_record(-1, "probe", self.optimizer.param_groups, train, val, seconds, seconds)
        record["lr"] = record["backbone_lr"] = 0.0
        self.stopper.update(0, record[self.cfg.monitor], loss=record["val_loss"])
        save_model(self.dir / "checkpoints/best.safetensors", self.model, self.metadata)
        return record

    def _cached_epoch(self, epoch: int, train_set: FeatureSet, val_set: FeatureSet, on_batch) -> tuple:
        """One frozen epoch on cached features: same batches, lrs and steps as the backbone path."""
        head, device, bs = PooledHead(self.model), self.fabric.device, self.cfg.batch_size
        head.train()
        batches = train_set.batches(BatchSampler(self.sampler, bs, self.drop_last), epoch % self.cached_views, device)
        train = train_one_epoch(
            self.fabric, head, batches, self.loss_fn, self.optimizer, lambda batch: self.set_lr(epoch, batch),
            on_batch=on_batch,
        )
        return train, evaluate(self.fabric, head, self._in_order(val_set), self.eval_loss_fn, len(self.labels))

    def _in_order(self, features: FeatureSet):
        """Evaluation batches of the first view of cached features."""
        return features.batches(BatchSampler(range(len(features.targets)), self.eval_batch_size, False), 0,
                                self.fabric.device)

    def _save_epoch(self, epoch: int, history: list[dict], timings: dict) -> None:
        save_model(self.dir / "checkpoints/last.safetensors", self.model, self.metadata)
        write_metrics_csv(history, self.dir / "metrics.csv")
        save_state(
            self.dir / STATE_FILE,
            {
                "epoch": epoch + 1,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "early_stopping": self.stopper.state_dict(),
                "history": history,
                "timings": timings,
                "probe_choice": self.probe_choice,
                "finished": False,
            },
        )

    # -- the end ----------------------------------------------------------------------------------

    def _finish(self, history: list[dict], timings: dict, scanned: ScanResult, started: float) -> Run:
        if self.stopper.best_epoch is None:  # the monitor was never finite (e.g. NaN losses)
            log.warning("%s was never finite; keeping the last epoch as best", self.cfg.monitor)
            save_model(self.dir / "checkpoints/best.safetensors", self.model, self.metadata)
        best = Run(self.dir).load_model("best")
        self.model.load_state_dict(best.state_dict())
        t0 = time.perf_counter()
        results = {
            split: _result_dict(evaluate(self.fabric, self.module, loader, self.eval_loss_fn, len(self.labels)))
            for split, loader in self.eval_loaders.items()
        }
        timings["final_eval_s"] = time.perf_counter() - t0
        timings["train_s"] = sum(timings["epochs_s"])
        timings["wall_s"] = time.perf_counter() - started  # this process only, when resumed
        probe = next((record for record in history if record["stage"] == "probe"), None)
        summary = {
            "best_epoch": self.stopper.best_epoch,
            # epoch 0 is the linear probe: no fine-tuned epoch beat it on validation
            "kept": "probe" if self.stopper.best_epoch == 0 else "fine-tuned",
            "probe": None if probe is None else {
                "val_accuracy": probe["val_accuracy"], "val_f1_macro": probe["val_f1_macro"],
                "val_loss": probe["val_loss"], **self.probe_choice,
            },
            "monitor": self.cfg.monitor,
            "epochs_run": len(history),
            "stopped_early": len(history) < self.cfg.epochs,
            **results,
            "labels": self.labels,
            "counts": {
                split: {label: sum(1 for s in scanned.readable if s.split == split and s.label == label) for label in self.labels}
                for split in ("train", "val", "test")
            },
            "timings": timings,
            "skipped": [{"path": s.path, "reason": s.reason} for s in scanned.skipped],
            "empty_classes": self.empty_classes,
            "data_checks": {
                "errors": self.data_checks.errors,
                "warnings": self.data_checks.warnings,
                "cross_split_duplicates": self.data_checks.cross_split_duplicates,
            },
            "device": str(self.fabric.device),
        }
        write_text_atomic(self.dir / "summary.json", json.dumps(summary, indent=2))
        plot_history(history, self.dir / "history.png", self.cfg.freeze_epochs)
        final = load_state(self.dir / STATE_FILE)
        save_state(self.dir / STATE_FILE, {**final, "finished": True})
        self.console.print(_summary_line(summary, self.dir))
        run = Run(self.dir)
        if self.cfg.report:
            split = "test" if "test" in self.eval_loaders else "val"
            try:
                run.evaluate(split, device=self.cfg.device, workers=self.workers)
            except Exception as exc:  # the trained run is complete; a failed extra must not hide it
                log.warning("the run finished, but its evaluation report failed (%s: %s); retry with "
                            "visiontune evaluate %s", type(exc).__name__, exc, self.dir)
            else:
                self.console.print(f"report: {self.dir / 'report.html'}")
        return run


def _make_fabric(device: str) -> Fabric:
    if resolve_device(device).type == "cuda":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return Fabric(accelerator="cuda", devices=1, precision=precision)
    return Fabric(accelerator="cpu", devices=1, precision="32-true")


def _run_dir_for(cfg: TrainConfig) -> Path:
    """`cfg.out`, or a new timestamped folder (then written to `cfg.out`)."""
    if not cfg.out:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.out = str(Path("runs") / f"{stamp}-{cfg.model.replace('/', '_')}")
    return Path(cfg.out).expanduser()


def _new_run_dir(cfg: TrainConfig) -> Path:
    run_dir = _run_dir_for(cfg)
    unstarted_run = (run_dir / "config.yaml").is_file() and not (run_dir / STATE_FILE).exists()
    if run_dir.exists() and not is_only_lock(run_dir) and not unstarted_run:
        raise UserError(
            f"run directory {run_dir} already exists and is not empty; use --resume {run_dir} to "
            "continue it, or choose another --out"
        )
    cfg.out = str(run_dir)
    return run_dir


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


def _result_dict(result: EpochResult) -> dict:
    return {"accuracy": result.accuracy, "f1_macro": result.f1_macro, "loss": result.loss}


def _epoch_line(record: dict, epochs: int, best: bool) -> str:
    return (
        f"epoch {record['epoch']}/{epochs} [{record['stage']}] train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
        f"acc {record['val_accuracy']:.3f} f1 {record['val_f1_macro']:.3f} | {record['seconds']:.1f}s"
        + ("  [best]" if best else "")
    )


def _summary_line(summary: dict, run_dir: Path) -> str:
    if summary["kept"] == "probe":
        parts = [f"kept the linear probe (epoch 0): no fine-tuned epoch beat its validation {summary['monitor']}"]
    else:
        parts = [f"best epoch {summary['best_epoch']}"]
        if summary["probe"]:
            parts.append(f"linear probe val accuracy {summary['probe']['val_accuracy']:.3f}")
    for split in ("val", "test"):
        if split in summary:
            parts.append(f"{split} accuracy {summary[split]['accuracy']:.3f} macro-F1 {summary[split]['f1_macro']:.3f}")
    if summary["skipped"]:
        parts.append(f"{len(summary['skipped'])} file(s) skipped (listed in summary.json)")
    return "; ".join(parts) + f"\nrun saved to {run_dir}"
