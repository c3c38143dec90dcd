"""`adapt`: a trained run adapted to a target domain, written as a new run directory with its lineage.

The new directory is a run like any other (evaluate, predict, export and serve read it unchanged):
the source's model.json (plus `lineage`), labels, config and splits (paths made absolute), the
adapted weights, per-epoch metrics and a summary. threshold.json and calibration.json are not
copied: they were fitted on the source model's outputs. Everything is built in a hidden folder
beside --out and renamed into place at the end, so a failure leaves no half-written run.
"""

from __future__ import annotations

import csv
import difflib
import logging
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import safetensors.torch
import torch
from rich.console import Console
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from visiontune._version import __version__
from visiontune.adapt.batchnorm import batch_norms, recompute_batch_norm_statistics
from visiontune.adapt.data import (
    LabelledTarget,
    TargetImages,
    read_target,
    read_target_labels,
)
from visiontune.adapt.loop import EpochScorer, TrainingPlan, choose_epoch, run_epochs
from visiontune.adapt.mcc import DEFAULT_TEMPERATURE
from visiontune.data.dataset import (
    ImageDataset,
    ImageFiles,
    collate_image_files,
    collate_skipping_none,
    default_workers,
)
from visiontune.data.samples import Sample
from visiontune.data.sources import discover
from visiontune.errors import UserError
from visiontune.inference.engine import CPU_BATCH, CUDA_BATCH
from visiontune.inference.onnx import checkpoint_key
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.losses import ClassificationLoss
from visiontune.models.param_groups import build_param_groups
from visiontune.runformat import (
    CALIBRATION_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LABELS_FILE,
    META_FILE,
    METRICS_FILE,
    SPLITS_FILE,
    SUMMARY_FILE,
    THRESHOLD_FILE,
    meta_fields,
)
from visiontune.training.checkpoint import save_model
from visiontune.training.history import write_metrics_csv
from visiontune.training.loop import EpochResult, evaluate
from visiontune.training.setup import make_fabric

log = logging.getLogger(__name__)
METHODS = ("adabn", "mcc", "finetune", "mixed")
LABELLED_METHODS = ("finetune", "mixed")
NOT_COPIED = {
    THRESHOLD_FILE: "fitted on the source model's validation probabilities; refit with evaluate --target-recall",
    CALIBRATION_FILE: "fitted on the source model's validation logits; refit with evaluate --temperature",
}
UNLABELLED_NOTE = "no target labels were used, for training or for choosing: "
SOURCE_DROP_WARNING = 0.1  # source val accuracy lost, with nothing labelled on the target to show a gain


def adapt(
    run_dir: str | Path, target: str | Path, method: str, out: str | Path, *,
    target_labels: str | Path | None = None, shots: int | None = None, epochs: int = 5, lr: float = 1e-4,
    trade_off: float = 1.0, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, batch_size: int | None = None,
    device: str = "auto", workers: int | None = None, progress: bool = True,
) -> Path:
    """Adapt the best model of `run_dir` to the images of `target` and write it as the new run `out`.

    adabn re-estimates BatchNorm statistics on the target images; mcc fine-tunes on the run's
    source training images plus Minimum Class Confusion on unlabelled target images; finetune
    trains on `shots` labelled target images per class (all without `shots`) from `target_labels`;
    mixed trains on source and labelled target images together, each domain drawn half the time.
    Target test images are never opened. Returns `out`.
    """
    started = time.perf_counter()
    out = Path(out).expanduser()
    _check_request(method, out, target_labels, shots, epochs, lr)
    source = ClassifierRun(run_dir)
    cfg, labels, source_summary = source.config, source.labels, source.summary
    model = source.load_model("best")
    if method == "adabn" and not batch_norms(model):
        raise UserError(f"{source.metadata['model']} has no BatchNorm layers, so AdaBN has nothing to re-estimate; "
                        "use --method mcc (no target labels) or --method finetune (labelled target images)")
    splits = _source_splits(source)
    if method in ("mcc", "mixed") and not splits["train"]:
        raise UserError(f"{source.dir} lists no training images in {SPLITS_FILE}; --method {method} trains on them")
    images = read_target(target, cfg.max_pixels, seed)
    labelled = (read_target_labels(target_labels, labels, shots, cfg.max_pixels, seed)
                if method in LABELLED_METHODS else None)

    torch.manual_seed(seed)
    fabric = make_fabric(device)
    console = Console(quiet=not progress, highlight=False, soft_wrap=True)
    data = _Data(fabric, source, batch_size or cfg.batch_size, default_workers() if workers is None else workers, seed)
    kind = source.metadata.get("loss", cfg.loss)
    eval_loss = ClassificationLoss(kind, len(labels)).to(fabric.device)
    metadata = {**source.metadata, **meta_fields("classifier", __version__),
                "lineage": _lineage(source, target, target_labels, method, images, labelled,
                                    {"epochs": epochs, "lr": lr, "trade_off": trade_off, "temperature": temperature,
                                     "shots": shots, "seed": seed, "batch_size": data.batch_size})}
    build = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    build.mkdir()
    try:
        checkpoints = build / CHECKPOINT_DIR
        if method == "adabn":
            network = fabric.setup(model)
            scorer = _scorer(data, network, eval_loss, images.all, splits["val"], None)
            records = _adabn(network, scorer, data, images, console)
            kept, criterion = 1, "AdaBN trains no epochs: the re-estimated statistics are kept"
            save_model(checkpoints / "best.safetensors", model, metadata)
        else:
            model = model.to(memory_format=torch.channels_last)
            groups = build_param_groups(model, cfg.weight_decay, 1.0, set())  # one lr for the whole network
            network, optimizer = fabric.setup(model, torch.optim.AdamW(groups, lr=lr))
            loss = ClassificationLoss(kind, len(labels), label_smoothing=cfg.label_smoothing).to(fabric.device)
            plan = _plan(method, data, splits["train"], images, labelled, trade_off, temperature)
            scorer = _scorer(data, network, eval_loss, images.held_out, splits["val"], labelled)
            epoch_file = lambda epoch: checkpoints / f"epoch-{epoch}.safetensors"
            records = run_epochs(fabric, network, optimizer, plan, loss, scorer, epochs, lr,
                                 lambda epoch: save_model(epoch_file(epoch), model, metadata), console)
            kept, criterion = choose_epoch(records, trained_on_target_labels=labelled is not None)
            os.replace(epoch_file(kept), checkpoints / "best.safetensors")
            for epoch in range(epochs + 1):
                epoch_file(epoch).unlink(missing_ok=True)
            safetensors.torch.load_model(model, str(checkpoints / "best.safetensors"), device=str(fabric.device))
        final = {split: _result(evaluate(fabric, network, data.labelled(samples), eval_loss, len(labels)))
                 for split, samples in splits.items() if samples and split != "train"}
        summary = _summary(method, source, source_summary, splits, records, kept, criterion, final, images,
                           labelled, str(fabric.device), time.perf_counter() - started)
        _write_run(build, source, metadata, records, summary)
        _publish(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    console.print(f"kept epoch {records[kept]['epoch']} ({criterion}); source val accuracy "
                  f"{_fmt(records[0]['source_val_accuracy'])} -> {_fmt(records[kept]['source_val_accuracy'])}; "
                  f"adapted run saved to {out}", markup=False)
    if summary["adaptation"]["warning"]:
        log.warning(summary["adaptation"]["warning"])
    return out


def source_drop_warning(records: list[dict], kept: int) -> str | None:
    """A warning when the kept model lost much source validation accuracy and no labelled target
    image measured a gain to weigh against it (measured: the AdaBN that lost 31 points on the
    hymenoptera source lost 16 on its X-ray-like target too; docs/benchmarks.md, "Domain shift")."""
    before, after = records[0]["source_val_accuracy"], records[kept]["source_val_accuracy"]
    if before is None or after is None or records[kept]["target_val_accuracy"] is not None:
        return None
    if before - after <= SOURCE_DROP_WARNING:
        return None
    return (f"the adapted model lost {before - after:.2f} of source validation accuracy ({before:.3f} -> {after:.3f}) "
            f"and no labelled target validation image shows what it gained: evaluate it on labelled target images "
            f"(visiontune evaluate NEW_RUN --data DIR) before using it")


def _check_request(method: str, out: Path, target_labels, shots: int | None, epochs: int, lr: float) -> None:
    """Every option mistake, before anything is read or written."""
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {method!r}"
                        + (f"; did you mean {close[0]}?" if close else ""))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; adapt never overwrites a run: choose a new directory")
    if method in LABELLED_METHODS and target_labels is None:
        raise UserError(f"--method {method} trains on labelled target images: pass --target-labels (a folder with "
                        "one sub-folder per class, or a CSV file of path,label)")
    if shots is not None and method not in LABELLED_METHODS:
        raise UserError(f"--shots is for --method finetune or mixed, not {method}")
    if epochs < 1 or not lr > 0:
        raise UserError(f"--epochs must be at least 1 and --lr positive (got {epochs} and {lr})")


class _Data:
    """Loaders over the run's preprocessing: eval batches in order, training batches seeded."""

    def __init__(self, fabric, source: ClassifierRun, batch_size: int, workers: int, seed: int) -> None:
        cfg, pre = source.config, source.preprocessing
        self.fabric, self.batch_size, self.workers, self.max_pixels = fabric, batch_size, workers, cfg.max_pixels
        self.index = {label: i for i, label in enumerate(source.labels)}
        self.eval_transform = pre.eval_transform()
        self.train_transform = pre.train_transform(cfg.augment, crop_scale=cfg.crop_scale)
        self.eval_batch_size = CPU_BATCH if fabric.device.type == "cpu" else CUDA_BATCH
        self.generator = torch.Generator().manual_seed(seed)

    def labelled(self, samples: list[Sample], train: bool = False) -> DataLoader:
        return self._loader(ImageDataset(samples, self.index, self._transform(train), self.max_pixels), train)

    def files(self, paths: list[str], train: bool = False) -> DataLoader:
        return self._loader(ImageFiles(paths, self._transform(train), self.max_pixels), train, collate_image_files)

    def balanced(self, first: list[Sample], second: list[Sample]) -> DataLoader:
        """Training batches drawing each of two sample lists half the time (the smaller oversampled)."""
        parts = [ImageDataset(samples, self.index, self.train_transform, self.max_pixels) for samples in (first, second)]
        weights = [1.0 / len(first)] * len(first) + [1.0 / len(second)] * len(second)
        sampler = WeightedRandomSampler(weights, len(weights), replacement=True, generator=self.generator)
        return self._loader(ConcatDataset(parts), True, sampler=sampler)

    def _transform(self, train: bool):
        return self.train_transform if train else self.eval_transform

    def _loader(self, dataset: Dataset, train: bool, collate=collate_skipping_none, sampler=None) -> DataLoader:
        options = {"num_workers": self.workers, "collate_fn": collate, "pin_memory": self.fabric.device.type == "cuda"}
        if train:
            options.update(batch_size=self.batch_size, drop_last=len(dataset) > self.batch_size)
            options.update(sampler=sampler) if sampler else options.update(shuffle=True, generator=self.generator)
        else:
            options.update(batch_size=self.eval_batch_size)
        return self.fabric.setup_dataloaders(DataLoader(dataset, **options))


def _scorer(data: _Data, network, loss: ClassificationLoss, held_out: list[str], source_val: list[Sample],
            labelled: LabelledTarget | None) -> EpochScorer:
    return EpochScorer(data.fabric, network, loss, len(data.index), data.files(held_out),
                       data.labelled(source_val) if source_val else None,
                       data.labelled(labelled.val) if labelled and labelled.val else None)


def _adabn(network, scorer: EpochScorer, data: _Data, images: TargetImages, console: Console) -> list[dict]:
    """Records of the source model (epoch 0) and of it with target BatchNorm statistics (epoch 1)."""
    records = []
    for epoch in (0, 1):
        t0 = time.perf_counter()
        if epoch == 1:
            batches = (batch for batch, _, _ in data.files(images.all) if batch is not None)
            if not recompute_batch_norm_statistics(network, batches):
                raise UserError("no batch of at least 2 target images could be read to re-estimate BatchNorm with")
        records.append({"epoch": epoch, **scorer.score(), "seconds": time.perf_counter() - t0})
        console.print(f"{'source' if epoch == 0 else 'AdaBN'}: source val accuracy "
                      f"{_fmt(records[-1]['source_val_accuracy'])}, target entropy {_fmt(records[-1]['target_entropy'])}",
                      markup=False)
    return records


def _plan(method: str, data: _Data, source_train: list[Sample], images: TargetImages,
          labelled: LabelledTarget | None, trade_off: float, temperature: float) -> TrainingPlan:
    if method == "mcc":
        return TrainingPlan(data.labelled(source_train, train=True), data.files(images.adapt, train=True),
                            trade_off, temperature)
    if method == "finetune":  # few-shot batches are too small for batch statistics: BatchNorms keep the run's
        return TrainingPlan(data.labelled(labelled.train, train=True), batch_norm_statistics="inference")
    return TrainingPlan(data.balanced(source_train, labelled.train))


def _source_splits(source: ClassifierRun) -> dict[str, list[Sample]]:
    """The run's samples by split, from its splits.csv (relative paths resolved against the run)."""
    found = discover(source.dir / SPLITS_FILE).samples if (source.dir / SPLITS_FILE).is_file() else []
    return {split: [s for s in found if s.split == split] for split in ("train", "val", "test")}


def _lineage(source: ClassifierRun, target, target_labels, method: str, images: TargetImages,
             labelled: LabelledTarget | None, options: dict) -> dict:
    return {
        "adapted_from": str(source.dir.resolve()),
        "source_checkpoint_sha256": checkpoint_key(source.checkpoint_path("best"))["sha256"],
        "source_lineage": source.metadata.get("lineage"),  # a run adapted before keeps its history
        "method": method,
        "target": str(Path(target).expanduser().resolve()),
        "target_labels": str(Path(target_labels).expanduser().resolve()) if target_labels else None,
        "target_images": len(images.all),
        "labelled_target_images": len(labelled.train) if labelled else 0,
        "target_test_images_left_out": images.test_left_out + (labelled.test_left_out if labelled else 0),
        "options": options,
        "visiontune_version": __version__,
    }


def _summary(method: str, source: ClassifierRun, source_summary: dict, splits: dict, records: list[dict], kept: int,
             criterion: str, final: dict, images: TargetImages, labelled: LabelledTarget | None, device: str,
             seconds: float) -> dict:
    """summary.json: the fields every run's has (so report and serve read it) plus the adaptation record."""
    labels = source.labels
    return {
        "best_epoch": records[kept]["epoch"],
        "kept": "adapted" if records[kept]["epoch"] else "source",
        "probe": None,
        "monitor": criterion,
        "epochs_run": len(records) - 1,
        **final,  # the kept model on the source val and test splits
        "labels": labels,
        "counts": {split: {label: sum(s.label == label for s in samples) for label in labels}
                   for split, samples in splits.items()},
        "skipped": source_summary.get("skipped", []),
        "data_checks": source_summary.get("data_checks", {"errors": [], "warnings": []}),
        "adaptation": {
            "method": method,
            "source_run": str(source.dir.resolve()),
            "source_val_accuracy": {"source_model": records[0]["source_val_accuracy"],
                                    "kept": records[kept]["source_val_accuracy"]},
            "criterion": criterion,
            "warning": source_drop_warning(records, kept),
            "kept_epoch": records[kept]["epoch"],
            "epochs": records,
            "target_labels_used": labelled is not None,
            "note": (UNLABELLED_NOTE if labelled is None else "labelled target images were trained on; ") + criterion,
            "target": {"adapted_on": len(images.adapt) if method != "adabn" else len(images.all),
                       "held_out": len(images.held_out) if method != "adabn" else 0,
                       "test_left_out_unopened": images.test_left_out,
                       "skipped": [{"path": s.path, "reason": s.reason} for s in images.skipped]},
            "labelled_target": None if labelled is None else {
                "trained_on": len(labelled.train), "validation": len(labelled.val),
                "validation_from": labelled.val_source, "test_left_out_unopened": labelled.test_left_out,
                "skipped": [{"path": s.path, "reason": s.reason} for s in labelled.skipped]},
            "not_copied": NOT_COPIED,
        },
        "timings": {"adapt_s": seconds, "epochs_s": [record["seconds"] for record in records]},
        "device": device,
    }


def _write_run(build: Path, source: ClassifierRun, metadata: dict, records: list[dict], summary: dict) -> None:
    write_text_atomic(build / META_FILE, json.dumps(metadata, indent=2))
    write_text_atomic(build / LABELS_FILE, json.dumps(source.labels, indent=2))
    shutil.copyfile(source.dir / CONFIG_FILE, build / CONFIG_FILE)
    splits = source.dir / SPLITS_FILE
    if splits.is_file():  # absolute paths: the new run finds the same images from wherever it lives
        with splits.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [{**row, "path": str((source.dir / row["path"]).resolve())} for row in reader]
        write_csv_atomic(build / SPLITS_FILE, list(reader.fieldnames or ["path", "label", "split"]), rows)
    write_metrics_csv(records, build / METRICS_FILE)
    write_text_atomic(build / SUMMARY_FILE, json.dumps(summary, indent=2))


def _publish(build: Path, out: Path) -> None:
    """Rename the finished run into place; rename replaces only an empty directory, never a run."""
    try:
        os.rename(build, out)
    except OSError:
        raise UserError(f"--out {out} was created and filled while adapting; the adapted run was not written") from None


def _result(result: EpochResult) -> dict:
    return {"accuracy": result.accuracy, "f1_macro": result.f1_macro, "loss": result.loss}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
