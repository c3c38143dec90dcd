"""Everything a run needs before its first epoch, built once: data, run files, model, loaders, optimizer.

Training (trainer.py) and the lr range test (lr_find.py) both start from a `TrainingSetup`, so the
range test sees exactly what training's first epoch of a stage would: the same backbone, weights,
preprocessing, sampler, loss, parameter groups and freezing. The order of `build_setup`'s steps is
part of the result: seeding, model creation and the loaders' generators must come in this order
for a run (and its resume) to be reproducible to the last digit.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import lightning.fabric
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from visiontune._version import __version__
from visiontune.config import TrainConfig
from visiontune.data.cache import DecodedImageCache
from visiontune.data.curation import curate
from visiontune.data.dataset import ImageDataset, collate_skipping_none
from visiontune.data.samples import Sample, SampleSet
from visiontune.data.sources import discover
from visiontune.data.splits import write_splits_csv
from visiontune.data.transforms import Preprocessing
from visiontune.data.validate import DataReport, ScanResult, check_samples, scan
from visiontune.devices import native_bf16_cpu, plan_cpu, resolve_device
from visiontune.errors import UserError
from visiontune.inference.engine import CPU_BATCH, CUDA_BATCH
from visiontune.io import atomic_write, read_json, write_text_atomic
from visiontune.locking import is_only_lock
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
from visiontune.runformat import (
    CONFIG_FILE,
    CURATION_FILE,
    LABELS_FILE,
    META_FILE,
    SPLITS_FILE,
    STATE_FILE,
    meta_fields,
)
from visiontune.training.distributed import Indexed, per_process_batch, shard_sampler
from visiontune.training.feature_cache import (
    FeatureSet,
    extract_features,
    fits_in_memory,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity, as for the model and loaders it holds
class TrainingSetup:
    """A run ready for its first epoch; `build_setup` makes one with every attribute set."""

    cfg: TrainConfig
    console: Console  # status lines while scanning and probing (quiet without progress)
    fabric: Fabric
    workers: int  # DataLoader workers (the CPU plan's on a CPU)
    scanned: ScanResult  # the readable samples, with their split, and the skipped files
    scan_s: float
    labels: list[str]
    empty_classes: list[str]
    curation: dict  # what --exclude / --relabel changed (data.curation.curate's record)
    data_checks: DataReport
    pre: Preprocessing
    metadata: dict  # model.json, also in every checkpoint's header
    model: nn.Module  # the classifier alone: what checkpoints save
    normalize: nn.Module  # the loaders' uint8 -> float step on the device (identity for float batches)
    module: nn.Module  # normalize + model, set up by Fabric (compiled with --compile): what trains
    optimizer: torch.optim.Optimizer
    fixed: set[str]  # backbone parameters frozen for the whole run (--unfreeze-from)
    train_ds: ImageDataset
    val_ds: ImageDataset
    train_eval_ds: ImageDataset  # the training images un-augmented, as the linear probe sees them
    generator: torch.Generator  # the sampler's; reseeded every epoch
    sampler: Sampler  # the global draws (the cached stage batches them whole on every process)
    drop_last: bool
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]  # "val", and "test" when there is a test split
    eval_batch_size: int
    loader_options: dict
    cached_views: int  # views of each training image the frozen stage caches; 0 = no cache
    loss_fn: ClassificationLoss  # training's: class weights and label smoothing as configured
    eval_loss_fn: ClassificationLoss

    def stage_of(self, epoch: int) -> tuple[str, int, int]:
        """(stage name, first epoch of the stage, epochs in the stage) for 0-based `epoch`."""
        cfg = self.cfg
        if epoch < cfg.freeze_epochs:
            return "frozen", 0, cfg.freeze_epochs
        return "unfrozen", cfg.freeze_epochs, cfg.epochs - cfg.freeze_epochs

    def prepare_epoch(self, epoch: int, same_on_every_rank: bool = False) -> None:
        """Reseed, set train mode and the stage's freezing: data order and augmentation follow (seed, epoch).

        The sampler's draws are the same on every process; augmentation and dropout differ per
        process (rank 0 draws as a single process does), unless `same_on_every_rank` (the cached
        stage, where every process trains the same head on the same batches).
        """
        stage, _, _ = self.stage_of(epoch)
        rank = 0 if same_on_every_rank else self.fabric.global_rank
        lightning.fabric.seed_everything(self.cfg.seed + epoch + 1_000_003 * rank, verbose=False)
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + epoch)
        self.module.train()
        apply_freezing(self.model, stage == "frozen", self.cfg.train_bn, self.fixed, self.cfg.bn_statistics)

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


def build_setup(
    cfg: TrainConfig, console: Console, run_dir: Path | None = None, resuming: bool = False,
    fabric: Fabric | None = None,
) -> TrainingSetup:
    """Data, model, loaders and optimizer for `cfg`, in the order that makes a run reproducible.

    A new run writes config.yaml, splits.csv, labels.json and model.json to `run_dir` (rank 0
    alone under DDP); a resumed one (`resuming`) reads its splits from there and starts from no
    pretrained weights (its state replaces them); with no `run_dir` (the lr range test) nothing is
    read or written there. `fabric`: a launched one (training.finetune); default one process.
    """
    fabric = fabric or make_fabric(cfg.device)
    workers = _plan_workers(cfg, fabric)
    if not resuming:  # a missing download stops the run before any data is read
        check_weights_available(cfg.model, cfg.pretrained, cfg.weights)
    source = discover(run_dir / SPLITS_FILE) if resuming else _discover(cfg)
    if resuming:  # splits.csv already holds the curated samples
        curation = read_json(run_dir / CURATION_FILE) if (run_dir / CURATION_FILE).is_file() else {}
    else:
        source.samples, curation = curate(source.samples, cfg.exclude, cfg.relabel)
        _log_curation(curation)
    t0 = time.perf_counter()
    scanned = _scan(source, cfg.max_pixels, console)
    scan_s = time.perf_counter() - t0
    labels = sorted({s.label for s in scanned.readable})
    _check_splits(labels, scanned.readable)
    lightning.fabric.seed_everything(cfg.seed, verbose=False)
    model = create_classifier(
        cfg.model, len(labels), pretrained=cfg.pretrained and not resuming,
        weights=None if resuming else cfg.weights,
    )
    pre = Preprocessing.from_model(model, cfg.image_size, cfg.crop_mode)
    metadata = _metadata(cfg, labels, pre)
    data_checks = check_samples(source, cfg.max_pixels, scanned=scanned)
    for problem in data_checks.errors if not resuming else []:
        log.warning("data check: %s", problem)
    if run_dir is not None and not resuming and fabric.is_global_zero:
        _write_run_files(cfg, run_dir, scanned, labels, metadata)
        write_text_atomic(run_dir / CURATION_FILE, json.dumps(curation, indent=2))

    index = {label: i for i, label in enumerate(labels)}
    by_split = {split: [s for s in scanned.readable if s.split == split] for split in ("train", "val", "test")}
    # With the decoded cache, loaders yield uint8 and the model's first step normalises on the device.
    cache = DecodedImageCache.for_preprocessing(pre) if cfg.decoded_cache else None
    float_in_loader = cache is None
    train_ds = ImageDataset(
        by_split["train"], index, pre.train_transform(cfg.augment, float_in_loader, cfg.crop_scale),
        cfg.max_pixels, cache,
    )
    counts = [train_ds.targets.count(i) for i in range(len(labels))]
    generator = torch.Generator()
    sampler = _train_sampler(cfg, train_ds, counts, generator)
    batch_size = per_process_batch(cfg.batch_size, fabric.world_size)
    common = dict(
        num_workers=workers, collate_fn=collate_skipping_none,
        persistent_workers=workers > 0, pin_memory=fabric.device.type == "cuda",
    )
    drop_last = len(train_ds) > cfg.batch_size
    train_loader = fabric.setup_dataloaders(
        DataLoader(train_ds, batch_size, sampler=shard_sampler(sampler, fabric, drop_last), drop_last=drop_last, **common),
        use_distributed_sampler=False,
    )
    eval_sets = {
        split: ImageDataset(items, index, pre.eval_transform(float_in_loader), cfg.max_pixels, cache)
        for split, items in by_split.items()
        if items and split != "train"
    }
    # inference batches: small on a CPU, where large ones fall out of cache (2x slower measured)
    eval_batch_size = CPU_BATCH if fabric.device.type == "cpu" else CUDA_BATCH
    # under DDP each process evaluates its share (Fabric's DistributedSampler), with indices to join them
    indexed = Indexed if fabric.world_size > 1 else (lambda ds: ds)
    eval_loaders = {
        split: fabric.setup_dataloaders(DataLoader(indexed(ds), eval_batch_size, **common))
        for split, ds in eval_sets.items()
    }
    # the probe sees training images as evaluation does: un-augmented
    train_eval_ds = ImageDataset(by_split["train"], index, pre.eval_transform(float_in_loader), cfg.max_pixels, cache)
    cached_views = _cached_views(cfg, model, len(train_ds))
    weights = class_weights_for(counts) if cfg.balance == "weights" else None
    loss_args = dict(kind=cfg.loss, num_classes=len(labels), focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma)
    loss_fn = ClassificationLoss(class_weights=weights, label_smoothing=cfg.label_smoothing, **loss_args).to(fabric.device)
    eval_loss_fn = ClassificationLoss(**loss_args).to(fabric.device)

    fixed = fixed_parameter_names(model, cfg.unfreeze_from)
    # channels_last on CPU too: CNN training steps ran 2x faster here (docs/benchmarks.md)
    model = model.to(memory_format=torch.channels_last)
    groups = build_param_groups(model, cfg.weight_decay, cfg.lr_mult, fixed)
    optimizer = torch.optim.AdamW(groups, lr=0.0)  # the trainer sets every step's lr
    normalize = pre.normalizer()  # float batches pass through unchanged
    network = nn.Sequential(normalize, model)  # checkpoints save the model alone
    module, optimizer = fabric.setup(torch.compile(network) if cfg.compile else network, optimizer)
    return TrainingSetup(
        cfg=cfg, console=console, fabric=fabric, workers=workers, scanned=scanned, scan_s=scan_s, labels=labels,
        empty_classes=source.empty_classes, curation=curation, data_checks=data_checks, pre=pre, metadata=metadata, model=model,
        normalize=normalize, module=module, optimizer=optimizer, fixed=fixed, train_ds=train_ds,
        val_ds=eval_sets["val"], train_eval_ds=train_eval_ds, generator=generator, sampler=sampler,
        drop_last=drop_last, train_loader=train_loader, eval_loaders=eval_loaders, eval_batch_size=eval_batch_size,
        loader_options=common, cached_views=cached_views, loss_fn=loss_fn, eval_loss_fn=eval_loss_fn,
    )


def run_dir_for(cfg: TrainConfig) -> Path:
    """`cfg.out`, or a new timestamped folder (then written to `cfg.out`)."""
    if not cfg.out:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.out = str(Path("runs") / f"{stamp}-{cfg.model.replace('/', '_')}")
    return Path(cfg.out).expanduser()


def new_run_dir(cfg: TrainConfig) -> Path:
    """The run directory of a new run: empty (but for its lock), or a run that never finished an epoch."""
    run_dir = run_dir_for(cfg)
    unstarted_run = (run_dir / CONFIG_FILE).is_file() and not (run_dir / STATE_FILE).exists()
    if run_dir.exists() and not is_only_lock(run_dir) and not unstarted_run:
        raise UserError(
            f"run directory {run_dir} already exists and is not empty; use --resume {run_dir} to "
            "continue it, or choose another --out"
        )
    cfg.out = str(run_dir)
    return run_dir


def make_fabric(device: str, devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto") -> Fabric:
    """Fabric for `device`: mixed precision on a GPU, fp32 on the CPU (training and `adapt` alike).

    More than one process (or strategy ddp) is DDP, on the gloo backend on a CPU; parameters a
    stage freezes get no gradient, hence find_unused_parameters. `fabric.launch()` starts it.
    """
    cuda = resolve_device(device).type == "cuda"
    per_node = (torch.cuda.device_count() if cuda else 1) if devices == "auto" else int(devices)
    if strategy == "ddp" or per_node * num_nodes > 1:
        strategy = DDPStrategy(find_unused_parameters=True)
    if cuda:
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return Fabric(accelerator="cuda", devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision)
    return Fabric(accelerator="cpu", devices=per_node, num_nodes=num_nodes, strategy=strategy, precision="32-true")


def _plan_workers(cfg: TrainConfig, fabric: Fabric) -> int:
    """DataLoader workers; on a CPU the plan also sets torch's thread count."""
    if fabric.device.type == "cpu":
        cpu = plan_cpu(cfg.threads, cfg.workers)
        local_processes = max(1, fabric.world_size // cfg.num_nodes)
        if cfg.threads is None and local_processes > 1:  # the processes of a node share its free cores
            cpu = plan_cpu(max(1, cpu.threads // local_processes), cpu.workers)
        cpu.apply()
        log.info("CPU plan: %s", cpu.describe())
        return cpu.workers
    return cfg.workers if cfg.workers is not None else min(8, (os.cpu_count() or 2) - 1)


def _discover(cfg: TrainConfig) -> SampleSet:
    source = discover(cfg.data, cfg.label_regex, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    for name in source.empty_classes:
        log.warning("class folder '%s' has no images and is left out", name)
    for note in source.notes:
        log.warning(note)
    return source


def _log_curation(curation: dict) -> None:
    if curation["excluded"] or curation["relabelled"]:
        log.info("excluded %d image(s), relabelled %d (listed in %s)", len(curation["excluded"]),
                 len(curation["relabelled"]), CURATION_FILE)
    for path in curation["not_found"]:
        log.warning("--exclude / --relabel names %s, which is not in the data", path)


def _scan(source: SampleSet, max_pixels: int, console: Console) -> ScanResult:
    with console.status(f"checking {len(source.samples)} images"):
        scanned = scan(source.samples, max_pixels)
    for skipped in scanned.skipped:
        log.warning("skipping %s: %s", skipped.path, skipped.reason)
    return scanned


def _check_splits(labels: list[str], samples: list[Sample]) -> None:
    if len(labels) < 2:
        raise UserError(f"need at least 2 classes with readable images, found {labels}")
    for split in ("train", "val"):
        present = {s.label for s in samples if s.split == split}
        missing = [label for label in labels if label not in present]
        if missing:
            raise UserError(f"no readable {split} images for class(es): {', '.join(missing)}")


def _metadata(cfg: TrainConfig, labels: list[str], pre: Preprocessing) -> dict:
    return {
        **meta_fields("classifier", __version__),
        "model": cfg.model,
        "labels": labels,
        "preprocessing": pre.to_dict(),
        "loss": cfg.loss,
        "config": cfg.model_dump(),
    }


def _write_run_files(cfg: TrainConfig, run_dir: Path, scanned: ScanResult, labels: list[str], metadata: dict) -> None:
    """Atomically: a run directory never holds half a config.yaml, labels.json or model.json."""
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: cfg.to_yaml(Path(tmp)))
    write_splits_csv(scanned.readable, run_dir / SPLITS_FILE)
    write_text_atomic(run_dir / LABELS_FILE, json.dumps(labels, indent=2))
    write_text_atomic(run_dir / META_FILE, json.dumps(metadata, indent=2))


def _train_sampler(cfg: TrainConfig, train_ds: ImageDataset, counts: list[int], generator: torch.Generator) -> Sampler:
    """Class-balanced draws with replacement (--balance sampler), else a shuffle; both drawn from `generator`."""
    if cfg.balance == "sampler":
        sample_weights = [1.0 / counts[t] for t in train_ds.targets]
        return WeightedRandomSampler(sample_weights, len(train_ds), replacement=True, generator=generator)
    return RandomSampler(train_ds, generator=generator)


def _cached_views(cfg: TrainConfig, model: nn.Module, train_size: int) -> int:
    """Views of each training image the frozen stage trains on from cached features; 0 = no cache."""
    if not cfg.feature_cache or cfg.freeze_epochs == 0:
        return 0
    views = cfg.feature_views or (1 if cfg.augment == "none" else min(cfg.freeze_epochs, 4))
    views = 1 if cfg.augment == "none" else views  # without augmentation every view is the same
    return views if fits_in_memory(model, train_size, views) else 0
