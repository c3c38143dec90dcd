"""Evaluate an anomaly model on labelled images: score them, load their masks (at the model's input
size, binarised as in data.py), compute metrics.py's numbers, and write metrics.json, a histogram
of the scores about the saved threshold and a self-contained report.html
(reporting/templates/anomaly.html) showing the numbers, the histogram and the worst cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from visiontune.anomaly.base import AnomalyModel, Scores
from visiontune.anomaly.components.anomaly_map import heatmap_overlay
from visiontune.anomaly.data import GOOD, LabelledImage, load_mask
from visiontune.anomaly.metrics import (
    RankedPixels,
    image_metrics,
    per_defect_type,
    pixel_metrics,
)
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.validate import Skipped
from visiontune.errors import UserError
from visiontune.evaluation.plots import score_histogram_png
from visiontune.io import write_text_atomic
from visiontune.reporting.html import render_page
from visiontune.runformat import REPORT_FILE

GALLERY = 8  # worst misses and false alarms shown in the report
OUTLINE = (0, 255, 0)
PER_TYPE_COLUMNS = ("images", "image_auroc", "recall_at_threshold", "recall_at_threshold_ci95", "mean_score",
                    "pixel_auroc")
HISTOGRAM_FILE = "score_histogram.png"


def evaluate_model(model: AnomalyModel, images: list[LabelledImage], out: Path | None = None) -> dict:
    scored = model.score([image.path for image in images])
    by_path = {image.path: image for image in images}
    kept = [by_path[path] for path in scored.paths]
    labels = np.array([image.is_anomalous for image in kept], dtype=int)
    if labels.min(initial=1) == 1 or labels.max(initial=0) == 0:
        raise UserError("after skipping unreadable files, evaluation needs both good and defect images")
    scores, threshold = scored.scores, model.threshold_
    masks, mask_skipped = _masks(kept, model)
    defects = [image.defect for image in kept]
    pixels = RankedPixels(scored.maps, masks, defects)
    metrics = image_metrics(scores, labels, threshold, model.threshold_rule_)
    metrics |= pixel_metrics(pixels)
    metrics["per_defect_type"] = per_defect_type(defects, scores, labels, threshold, pixels)
    del pixels  # its sorted copy of every pixel is not needed for the report
    metrics["skipped"] = [vars(s) for s in scored.skipped + mask_skipped]
    metrics["scored_by"] = model.backend  # torch, or onnx: the exported graph, within its check of torch
    if out is not None:
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        metrics["report"] = str(write_report(out / REPORT_FILE, model, kept, scored, masks, metrics))
    return metrics


def _masks(images: list[LabelledImage], model: AnomalyModel) -> tuple[list[np.ndarray | None], list[Skipped]]:
    """Per image: a boolean mask, all-False for good images, None where a defect has no usable mask."""
    size, masks, skipped = model.image_size, [], []
    for image in images:
        if not image.is_anomalous:
            masks.append(np.zeros((size, size), bool))
        elif image.mask is None:
            masks.append(None)
        else:
            try:
                masks.append(load_mask(image.mask, size, model.max_pixels))
            except ImageLoadError as exc:
                skipped.append(Skipped(str(image.mask), f"mask left out of pixel metrics: {exc}"))
                masks.append(None)
    return masks, skipped


def write_report(path: Path, model: AnomalyModel, images: list[LabelledImage], scored: Scores,
                 masks: list[np.ndarray | None], metrics: dict) -> Path:
    """`path`: the metrics, the per-type table and thumbnails of the worst misses and false alarms."""
    scores = scored.scores
    defects = [i for i, image in enumerate(images) if image.is_anomalous]
    goods = [i for i, image in enumerate(images) if not image.is_anomalous]
    misses = sorted(defects, key=lambda i: scores[i])[:GALLERY]
    alarms = sorted(goods, key=lambda i: -scores[i])[:GALLERY]

    def card(i: int) -> dict:
        return {"name": images[i].path.name, "defect": images[i].defect, "score": float(scores[i]),
                "flagged": bool(scores[i] >= model.threshold_),
                "picture": _thumbnail(model, images[i].path, scored.maps[i], masks[i])}

    extractor = model.extractor
    return render_page(
        "anomaly.html", path,
        title=f"{model.detector.method} on {extractor.backbone} ({', '.join(extractor.layers)}, {model.image_size} px)",
        threshold=model.threshold_, rule=model.threshold_rule_, metrics=metrics,
        summary={k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        columns=PER_TYPE_COLUMNS, per_type=metrics["per_defect_type"], skipped=metrics["skipped"],
        misses=[card(i) for i in misses], alarms=[card(i) for i in alarms],
        histogram=_score_histogram(path.parent / HISTOGRAM_FILE, model, images, scores),
    )


def _score_histogram(path: Path, model: AnomalyModel, images: list[LabelledImage], scores: np.ndarray) -> Path:
    """`path`: good images' scores and each defect type's, and the saved threshold with its rule."""
    types = [GOOD] + sorted({image.defect for image in images if image.is_anomalous})
    groups = {name: scores[[image.defect == name for image in images]] for name in types}
    caption = f"threshold {model.threshold_:.4g} ({model.threshold_rule_['rule']})"
    score_histogram_png(groups, model.threshold_, caption, path)
    return path


def _thumbnail(model: AnomalyModel, path: Path, anomaly_map: np.ndarray, mask: np.ndarray | None) -> Image.Image:
    """The heat map over the image at the model's input size, the mask's outline drawn on top."""
    size = model.image_size
    try:
        image = load_rgb(path, model.max_pixels).resize((size, size), Image.BILINEAR)
    except ImageLoadError:
        image = Image.new("RGB", (size, size), (128, 128, 128))
    pixels = np.array(heatmap_overlay(image, anomaly_map, *model.map_range_))
    if mask is not None and mask.any():
        pixels[mask & ~ndimage.binary_erosion(mask)] = OUTLINE
    return Image.fromarray(pixels)
