"""R-CNN on a fine-tuned classifier run: proposals, warped region crops, the run's frozen features
and class probabilities, optionally a linear SVM per class (hard-negative mining, Platt-scaled on
validation) and class-specific box regression, then per-class NMS.

The classifier run is one `visiontune train` fitted on `visiontune regions`' CSV, so its labels
are the detection classes plus `background`. Each region's features and probabilities come from
one forward pass (`logits_and_features`). Fitted weights are plain arrays in safetensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.metrics import average_precision_score
from torchvision.ops import batched_nms

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.detect.labelling import BACKGROUND, box_iou, crop_region
from visiontune.detect.proposals import MIN_SEARCH_SIDE, SEARCH_SIDE, ProposalCache, propose
from visiontune.detect.region_heads import (
    decode_boxes,
    fit_box_regressor,
    fit_platt,
    fit_svm,
    sigmoid,
    standardiser,
)
from visiontune.detect.types import Detections, ImageTargets
from visiontune.devices import resolve_device
from visiontune.errors import UserError, first_line
from visiontune.io import atomic_write, write_text_atomic
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.penultimate import logits_and_features

log = logging.getLogger(__name__)
WEIGHTS_FILE = "rcnn.safetensors"  # SVM, Platt and box-regression arrays, and the feature standardiser
FIT_FILE = "rcnn_fit.json"  # what fitting chose and counted
PROPOSALS_DIR = "proposals"


class RCNNOptions(BaseModel):
    """How an R-CNN detector is fitted and run; stored as `model.json`'s `rcnn`."""

    model_config = ConfigDict(extra="forbid")

    classifier_run: Path
    proposals: str = "fast"
    max_proposals: int = Field(300, ge=1)
    search_side: int = Field(SEARCH_SIDE, ge=MIN_SEARCH_SIDE)  # selective search on the image scaled to this side
    svm: bool = True
    box_regression: bool = True
    nms_iou: float = Field(0.3, gt=0, le=1)
    context: int = Field(16, ge=0)
    size: int | None = Field(None, ge=8)  # region crop side; None = the run's input size
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    svm_c: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1])  # chosen on val (mean AP)
    svm_iou_pos: float = 0.5  # Platt and C selection: a region of a class at this IoU or more
    svm_iou_neg: float = 0.3  # SVM negatives: below this IoU with every box of the class
    svm_mining_rounds: int = Field(2, ge=0)
    svm_max_negatives: int = Field(4000, ge=1)  # the mining working set, per class
    negatives_per_image: int = Field(200, ge=1)  # negatives kept per image (random, weighted back)
    regression_iou: float = 0.6
    regression_alpha: float = 1000.0
    regression_min_samples: int = 4
    score_floor: float = 0.01  # candidates scoring below this are background
    max_detections: int = Field(100, ge=1)
    device: str = "auto"

    @field_validator("classifier_run")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Absolute, so that model.json finds the run from any working directory."""
        return path.expanduser().absolute()


class RegionFeatures:
    """The classifier run as a region encoder: crops -> (penultimate features, class probabilities)."""

    def __init__(self, run_dir: Path, options: RCNNOptions) -> None:
        self.run = ClassifierRun(run_dir)
        self.device = resolve_device(options.device)
        self.model = self.run.load_model().to(self.device)
        self.labels = self.run.labels
        self.size = options.size or self.run.preprocessing.input_size
        if not 0 <= 2 * options.context < self.size:
            raise UserError(f"R-CNN context {options.context} leaves nothing of a {self.size}-pixel region crop")
        self.context = options.context
        self.batch_size = options.batch_size
        self.transform = self.run.preprocessing.eval_transform()
        self.temperature = self.run.temperature

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        picture = Image.fromarray(image)
        fill = tuple(round(v) for v in image.reshape(-1, 3).mean(axis=0))
        features, probabilities = [], []
        with torch.inference_mode():
            for start in range(0, len(boxes), self.batch_size):
                crops = [self.transform(Image.fromarray(crop_region(picture, box, self.size, self.context, fill)))
                         for box in boxes[start:start + self.batch_size]]
                logits, pooled = logits_and_features(self.model, torch.stack(crops).to(self.device))
                features.append(pooled.float().cpu().numpy())
                probabilities.append(torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy())
        if not features:
            dim = self.model.num_features
            return np.zeros((0, dim), np.float32), np.zeros((0, len(self.labels)), np.float32)
        return np.concatenate(features), np.concatenate(probabilities)


@dataclass
class Heads:
    """Fitted arrays; a class whose SVM or regressor could not be fitted has its flag 0."""

    feature_mean: np.ndarray  # [D]
    feature_scale: np.ndarray  # [D]
    svm_weight: np.ndarray | None = None  # [C, D]
    svm_bias: np.ndarray | None = None  # [C]
    platt: np.ndarray | None = None  # [C, 2]: a, b
    svm_fitted: np.ndarray | None = None  # [C] uint8
    regression_weight: np.ndarray | None = None  # [C, 4, D]
    regression_bias: np.ndarray | None = None  # [C, 4]
    regression_fitted: np.ndarray | None = None  # [C] uint8

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(value) for name, value in vars(self).items() if value is not None}


class RCNNDetector:
    """A fitted R-CNN: `detect_batch` gives each image's boxes, highest score first."""

    def __init__(self, classes: list[str], options: RCNNOptions, heads: Heads, encoder: RegionFeatures) -> None:
        self.classes = list(classes)
        self.options = options
        self.heads = heads
        self.encoder = encoder
        self.class_columns = class_columns(encoder.labels, self.classes)

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return [self.detect(np.asarray(image)) for image in images]

    def detect(self, image: np.ndarray) -> Detections:
        height, width = image.shape[:2]
        options = self.options
        proposals = propose(image, options.proposals, options.max_proposals, search_side=options.search_side)
        if len(proposals) == 0:
            return Detections.empty()
        features, probabilities = self.encoder(image, proposals)
        scores = self.scores(features, probabilities)  # [N, C]
        rows, labels = np.nonzero(scores >= self.options.score_floor)
        if len(rows) == 0:
            return Detections.empty()
        boxes = self.regressed(features[rows], proposals[rows], labels)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        kept_scores = scores[rows, labels]
        keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(kept_scores), torch.from_numpy(labels),
                           self.options.nms_iou).numpy()[: self.options.max_detections]
        return Detections(boxes[keep], kept_scores[keep], labels[keep])

    def scores(self, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """[N, C] scores: Platt-scaled SVM margins, or the classifier's probabilities."""
        heads = self.heads
        if not self.options.svm:
            return probabilities[:, self.class_columns].astype(np.float32)
        margins = self.standardised(features) @ heads.svm_weight.T + heads.svm_bias
        scores = sigmoid(heads.platt[:, 0] * margins + heads.platt[:, 1])
        return np.where(heads.svm_fitted.astype(bool), scores, 0.0).astype(np.float32)

    def regressed(self, features: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        heads = self.heads
        if not self.options.box_regression:
            return boxes
        standardised = self.standardised(features)
        deltas = np.einsum("nd,nkd->nk", standardised, heads.regression_weight[labels]) + heads.regression_bias[labels]
        deltas = np.where(heads.regression_fitted[labels, None].astype(bool), deltas, 0.0)
        return decode_boxes(boxes, deltas)

    def standardised(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.heads.feature_mean) / self.heads.feature_scale).astype(np.float32)


def class_columns(run_labels: list[str], classes: list[str]) -> np.ndarray:
    """The run's probability column of each detection class; the run must know every class and
    background (it was trained on `visiontune regions` of the same annotations)."""
    missing = [name for name in [*classes, BACKGROUND] if name not in run_labels]
    if missing:
        raise UserError(
            f"the classifier run's labels ({', '.join(run_labels)}) lack {', '.join(missing)}: train it on "
            "the CSV `visiontune regions` wrote for these annotations"
        )
    return np.array([run_labels.index(name) for name in classes], dtype=np.int64)


# -- fitting -----------------------------------------------------------------------------------------


@dataclass
class RegionTable:
    """Features of the regions of a set of images, with what each region overlaps per class."""

    features: np.ndarray  # [M, D]
    boxes: np.ndarray  # [M, 4]
    from_gt: np.ndarray  # [M] bool: the region is a true box
    gt_label: np.ndarray  # [M] class of a true-box region, -1 otherwise
    class_iou: np.ndarray  # [M, C] highest IoU with a true box of each class
    class_match: np.ndarray  # [M, C, 4] that true box
    weight: np.ndarray  # [M] 1 / share kept of the image's negatives (1 for all others)


def fit_rcnn(train: list[ImageTargets], val: list[ImageTargets], classes: list[str], out: Path,
             options: RCNNOptions) -> RCNNDetector:
    """Fit the SVMs and box regressors (as asked) on the train images' regions and Platt-scale / choose
    C on the val images'; weights in `out/rcnn.safetensors`, proposals cached in `out/proposals/`."""
    out = Path(out)
    if not train:
        raise UserError("R-CNN needs training images")
    encoder = RegionFeatures(options.classifier_run, options)
    class_columns(encoder.labels, classes)
    cache = ProposalCache(out / PROPOSALS_DIR, options.proposals, options.max_proposals, options.search_side)
    rng = np.random.default_rng(options.seed)
    train_table, train_skipped = _region_table(train, classes, encoder, cache, options, rng)
    val_table, val_skipped = _region_table(val, classes, encoder, cache, options, rng)
    if train_table is None:
        raise UserError("none of the training images could be read")
    mean, scale = standardiser(train_table.features)
    heads = Heads(mean, scale)
    summary: dict = {"train_regions": len(train_table.features),
                     "val_regions": 0 if val_table is None else len(val_table.features),
                     "skipped": train_skipped + val_skipped, "proposal_cache": {"hits": cache.hits, "misses": cache.misses}}
    standardise = lambda table: None if table is None else (table.features - mean) / scale
    x_train, x_val = standardise(train_table), standardise(val_table)
    if options.svm:
        summary["svm"] = _fit_svms(heads, train_table, x_train, val_table, x_val, len(classes), options)
    if options.box_regression:
        summary["regression_samples"] = _fit_regressors(heads, train_table, x_train, len(classes), options)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: safetensors.numpy.save_file(
        heads.arrays(), tmp, metadata={"classes": "\n".join(classes)}))
    write_text_atomic(out / FIT_FILE, _json(summary))
    return load_rcnn(out, {"rcnn": options.model_dump(mode="json"), "classes": classes})


def _region_table(images: list[ImageTargets], classes: list[str], encoder: RegionFeatures, cache: ProposalCache,
                  options: RCNNOptions, rng: np.random.Generator) -> tuple[RegionTable | None, list[dict]]:
    parts, skipped = [], []
    for targets, image in _decoded(images, skipped):
        proposals = cache.proposals(targets.path, image)
        boxes = np.concatenate([targets.boxes, proposals]).astype(np.float32)
        class_iou, class_match = _class_overlaps(boxes, targets, len(classes))
        from_gt = np.arange(len(boxes)) < len(targets.boxes)
        negative = ~from_gt & (class_iou.max(axis=1, initial=0.0) < options.svm_iou_neg)
        negatives = np.flatnonzero(negative)
        kept_negatives = rng.permutation(negatives)[: options.negatives_per_image]
        rows = np.sort(np.concatenate([np.flatnonzero(~negative), kept_negatives]))
        weight = np.ones(len(boxes), np.float32)
        weight[negative] = len(negatives) / max(1, len(kept_negatives))
        features, _ = encoder(image, boxes[rows])
        gt_label = np.full(len(boxes), -1, np.int64)
        gt_label[: len(targets.boxes)] = targets.labels
        parts.append(RegionTable(features, boxes[rows], from_gt[rows], gt_label[rows], class_iou[rows],
                                 class_match[rows], weight[rows]))
    if not parts:
        return None, skipped
    return RegionTable(*(np.concatenate([getattr(p, name) for p in parts]) for name in vars(parts[0]))), skipped


def _decoded(images: list[ImageTargets], skipped: list[dict]) -> Iterator[tuple[ImageTargets, np.ndarray]]:
    for targets in images:
        try:
            yield targets, np.asarray(load_rgb(targets.path, DEFAULT_MAX_PIXELS))
        except ImageLoadError as exc:
            log.warning("skipped %s: %s", targets.path, exc)
            skipped.append({"path": str(targets.path), "reason": str(exc)})


def _class_overlaps(boxes: np.ndarray, targets: ImageTargets, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per box and class: the highest IoU with a true box of that class, and that box."""
    class_iou = np.zeros((len(boxes), n_classes), np.float32)
    class_match = np.zeros((len(boxes), n_classes, 4), np.float32)
    if len(targets.boxes) == 0:
        return class_iou, class_match
    overlaps = box_iou(boxes, targets.boxes)
    for c in np.unique(targets.labels):
        members = np.flatnonzero(targets.labels == c)
        best = overlaps[:, members].argmax(axis=1)
        class_iou[:, c] = overlaps[np.arange(len(boxes)), members[best]]
        class_match[:, c] = targets.boxes[members[best]]
    return class_iou, class_match


def _fit_svms(heads: Heads, train: RegionTable, x_train: np.ndarray, val: RegionTable | None,
              x_val: np.ndarray | None, n_classes: int, options: RCNNOptions) -> dict:
    """One SVM per class (positives: the true boxes; negatives: regions below svm_iou_neg with every
    box of the class), C chosen by mean validation AP, Platt-scaled on validation regions."""
    fits = {c: [_fit_class_svms(train, x_train, k, c, options) for k in range(n_classes)] for c in options.svm_c}
    ap = {c: _mean_ap(fits[c], val, x_val, options) for c in options.svm_c}
    scored = {c: value for c, value in ap.items() if value is not None}
    chosen = max(scored, key=lambda c: (scored[c], -c)) if scored else options.svm_c[len(options.svm_c) // 2]
    fitted = fits[chosen]
    dim = x_train.shape[1]
    heads.svm_weight = np.stack([f[0] if f else np.zeros(dim, np.float32) for f in fitted]).astype(np.float32)
    heads.svm_bias = np.array([f[1] if f else 0.0 for f in fitted], np.float32)
    heads.svm_fitted = np.array([f is not None for f in fitted], np.uint8)
    calibration, table, x = ("val", val, x_val) if val is not None else ("train", train, x_train)
    platt = []
    for k in range(n_classes):
        margins = x @ heads.svm_weight[k] + heads.svm_bias[k]
        positive = (table.class_iou[:, k] >= options.svm_iou_pos)
        platt.append(fit_platt(margins, positive, table.weight))
    heads.platt = np.array(platt, np.float32)
    return {"c": chosen, "val_mean_ap": {str(c): v for c, v in ap.items()}, "platt_on": calibration,
            "fitted": [bool(f) for f in heads.svm_fitted]}


def _fit_class_svms(table: RegionTable, x: np.ndarray, k: int, c: float,
                    options: RCNNOptions) -> tuple[np.ndarray, float] | None:
    positives = x[table.from_gt & (table.gt_label == k)]
    negatives = x[~table.from_gt & (table.class_iou[:, k] < options.svm_iou_neg)]
    if len(positives) == 0 or len(negatives) == 0:
        return None
    return fit_svm(positives, negatives, c, options.svm_mining_rounds, options.svm_max_negatives, options.seed)


def _mean_ap(fitted: list, val: RegionTable | None, x_val: np.ndarray | None, options: RCNNOptions) -> float | None:
    """Mean over classes with validation positives of the SVM's region AP (negatives weighted back)."""
    if val is None:
        return None
    values = []
    for k, fit in enumerate(fitted):
        positive = val.class_iou[:, k] >= options.svm_iou_pos
        if fit is None or not positive.any() or positive.all():
            continue
        values.append(average_precision_score(positive, x_val @ fit[0] + fit[1], sample_weight=val.weight))
    return float(np.mean(values)) if values else None


def _fit_regressors(heads: Heads, table: RegionTable, x: np.ndarray, n_classes: int, options: RCNNOptions) -> list[int]:
    """Per class, ridge from features to the offsets of proposals overlapping a true box by regression_iou."""
    dim = x.shape[1]
    weight = np.zeros((n_classes, 4, dim), np.float32)
    bias = np.zeros((n_classes, 4), np.float32)
    counts = []
    for k in range(n_classes):
        rows = np.flatnonzero(~table.from_gt & (table.class_iou[:, k] >= options.regression_iou))
        counts.append(len(rows))
        if len(rows) >= options.regression_min_samples:
            weight[k], bias[k] = fit_box_regressor(x[rows], table.boxes[rows], table.class_match[rows, k],
                                                   options.regression_alpha)
    heads.regression_weight, heads.regression_bias = weight, bias
    heads.regression_fitted = np.array([n >= options.regression_min_samples for n in counts], np.uint8)
    return counts


# -- loading -----------------------------------------------------------------------------------------


def load_rcnn(run_dir: Path, meta: dict) -> RCNNDetector:
    """The detector fitted into `run_dir`; `meta["rcnn"]` holds its options, `meta["classes"]` (when
    given) its classes, else those saved with the weights. A relative classifier_run is resolved
    against `run_dir`."""
    run_dir = Path(run_dir)
    try:
        given = dict(meta["rcnn"])
        if not Path(given["classifier_run"]).expanduser().is_absolute():
            given["classifier_run"] = str(run_dir / given["classifier_run"])
        options = RCNNOptions.model_validate(given)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{run_dir}: model.json has no valid 'rcnn' options: {first_line(exc, 300)}") from None
    path = run_dir / WEIGHTS_FILE
    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            saved_classes = (handle.metadata() or {}).get("classes", "")
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (the detector was not fitted to the end)") from None
    except Exception as exc:  # safetensors' errors for a truncated or foreign file
        raise UserError(f"{path} is damaged or truncated: {first_line(exc, 300)}") from None
    classes = list(meta.get("classes") or (saved_classes.split("\n") if saved_classes else []))
    try:
        heads = Heads(**arrays)
    except TypeError:
        raise UserError(f"{path} holds other arrays than an R-CNN detector's: {', '.join(sorted(arrays))}") from None
    needed = (["svm_weight", "svm_bias", "platt", "svm_fitted"] if options.svm else []) + (
        ["regression_weight", "regression_bias", "regression_fitted"] if options.box_regression else [])
    missing = [name for name in needed if getattr(heads, name) is None]
    if missing or (heads.svm_weight is not None and len(heads.svm_weight) != len(classes)):
        raise UserError(f"{path} does not fit model.json's options or classes (missing {', '.join(missing) or 'none'})")
    return RCNNDetector(classes, options, heads, RegionFeatures(options.classifier_run, options))


def _json(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"
