"""The audit's one frozen-backbone pass: pooled features of every readable labelled image, with
its path, split and label; or the same rows read back from a `visiontune features` file."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.errors import UserError
from visiontune.features.extraction import (
    SPLIT_DEFAULTS,
    build_extractor,
    list_inputs,
    plan_extraction,
)
from visiontune.features.store import load_features
from visiontune.models.extractor import iter_features

log = logging.getLogger(__name__)


@dataclass
class FeatureRows:
    """One row per readable image: pooled features [N, D], paths, splits, class indices into `classes`."""

    features: np.ndarray
    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    classes: list[str]
    backbone: str
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} of unreadable files


def frozen_features(data, *, model: str | None = None, run: str | Path | None = None,
                    weights: str | Path | None = None, pretrained: bool = True, image_size: int | None = None,
                    label_regex: str | None = SPLIT_DEFAULTS["label_regex"],
                    val_fraction: float = SPLIT_DEFAULTS["val_fraction"],
                    test_fraction: float = SPLIT_DEFAULTS["test_fraction"], seed: int = SPLIT_DEFAULTS["seed"],
                    batch_size: int = 32, workers: int | None = None, threads: int | None = None,
                    device: str = "auto") -> FeatureRows:
    """`data` listed and split exactly as `train` splits it, through the backbone of `model` or `run`."""
    inputs = list_inputs(data, label_regex, val_fraction, test_fraction, seed)
    extractor, preprocessing = build_extractor(model, run, None, weights, pretrained, image_size, seed)
    torch_device, workers = plan_extraction(device, threads, workers)
    kept, skipped, rows = [], [], []
    for batch in iter_features(extractor, preprocessing.eval_transform(), inputs.paths, "avg", batch_size, workers,
                               torch_device):
        kept += batch.indices
        skipped += [{"path": inputs.paths[i], "reason": reason} for i, reason in batch.skipped]
        if batch.indices:
            rows.append(batch.arrays["features"])
    for row in skipped:
        log.warning("skipped %s: %s", row["path"], row["reason"])
    if not kept:
        raise UserError("none of the images could be read; see the skipped files")
    return FeatureRows(np.concatenate(rows), [inputs.paths[i] for i in kept], [inputs.splits[i] for i in kept],
                       inputs.labels[kept], inputs.classes, extractor.backbone, skipped)


def stored_features(path: str | Path) -> FeatureRows:
    """The rows of a `visiontune features DATA --out FILE` file (pooled features, the default)."""
    stored = load_features(path)
    if "features" not in stored:
        layers = sorted(k for k in stored if k.startswith("features."))
        raise UserError(f"{path} holds per-layer features ({', '.join(layers)}); near-duplicates need the pooled "
                        "features of `visiontune features DATA --out FILE` without --layers")
    return FeatureRows(np.asarray(stored["features"], dtype=np.float32), list(stored["paths"]),
                       list(stored["splits"]), np.asarray(stored["labels"]), list(stored["classes"]),
                       str(stored["meta"].get("model", "")))
