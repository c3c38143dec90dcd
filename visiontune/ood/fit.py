"""The OOD scorers of a classifier run: fitted on its training and validation images, read back
for predict, evaluate and serve.

RUN/ood.json records the checkpoint it was fitted for: scores of a retrained or adapted network
against another network's features would mean nothing, so a stale fit is ignored with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torch import nn

from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.inference.engine import iter_logits, load_for_inference, plan_inference
from visiontune.inference.onnx import checkpoint_key
from visiontune.models.classifier_run import ClassifierRun
from visiontune.ood.detector import KEEP, OOD_FILE, PRIMARY, OODDetector

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    """Logits and penultimate features of the readable images among some paths, in order."""

    paths: list[str]
    logits: np.ndarray
    features: np.ndarray


def extract(model, plan, transform, paths: list[str], max_pixels: int) -> Extracted:
    """Run `model` (a `load_for_inference` model) over `paths`, keeping logits and features."""
    kept, logits, features = [], [], []
    for batch in iter_logits(model, transform, paths, max_pixels=max_pixels, plan=plan, features=True):
        if batch.paths:
            kept += batch.paths
            logits.append(batch.logits)
            features.append(batch.features)
    if not kept:
        return Extracted([], np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
    return Extracted(kept, np.concatenate(logits), np.concatenate(features))


def fit_ood(run: ClassifierRun, model: nn.Module | None = None, k: int | None = None, keep: float = KEEP,
            batch_size: int | None = None, workers: int | None = None, device: str = "auto") -> dict:
    """Fit the scorers on RUN's training images, thresholds on its validation images; write
    RUN/ood.json + RUN/ood.safetensors and return ood.json's record.

    `model` (the run's network, already in memory at the end of `train`) runs in torch; without
    it the run's best checkpoint runs as `predict` would run it.
    """
    train, val = run.split_samples("train"), run.split_samples("val")
    if not train or not val:
        raise UserError(f"{run.dir} needs training and validation images in splits.csv to fit OOD scores")
    plan = plan_inference(resolve_device(device), batch_size, workers=workers,
                          backend="torch" if model is not None else None)
    if model is None:
        model, plan = load_for_inference(run, plan, fallback=True)
    transform, max_pixels = run.preprocessing.eval_transform(), run.config.max_pixels
    fitted = extract(model, plan, transform, [str(p) for p, _ in train], max_pixels)
    held = extract(model, plan, transform, [str(p) for p, _ in val], max_pixels)
    if not fitted.paths:
        raise UserError(f"none of {run.dir}'s training images could be read to fit OOD scores")
    index, label_of = {label: i for i, label in enumerate(run.labels)}, {str(p): label for p, label in train}
    labels = np.array([index[label_of[p]] for p in fitted.paths])
    detector = OODDetector(k, keep).fit(fitted.features, labels, held.logits, held.features)
    val_flagged = detector.flag(detector.score(held.logits, held.features))
    record = {
        "fitted_on": {"bank": "train", "thresholds": "val"}, "train_images": len(fitted.paths),
        "val_images": len(held.paths), "val_flagged": float(val_flagged.mean()),
        "checkpoint_sha256": checkpoint_key(run.checkpoint_path("best"))["sha256"],
    }
    detector.save(run.dir, **record)
    return {"primary": PRIMARY, "thresholds": detector.thresholds_, "k": detector.k_, **record}


def load_ood(run: ClassifierRun) -> OODDetector | None:
    """The run's fitted scorers; None (with a warning when stale) when there are none for its checkpoint."""
    if not (run.dir / OOD_FILE).is_file():
        return None
    detector = OODDetector.load(run.dir)
    fitted_for = detector.record_.get("checkpoint_sha256")
    if fitted_for != checkpoint_key(run.checkpoint_path("best"))["sha256"]:
        log.warning("%s was fitted for another checkpoint: no OOD scores until `visiontune ood fit %s`",
                    run.dir / OOD_FILE, run.dir)
        return None
    return detector
