"""A detector run read back: `predict` boxes on new images and `evaluate` a split or new annotations.

Whatever the method, the run's score threshold (chosen on validation for a target recall) and
per-class NMS at IoU 0.5 (torchvision's batched_nms; idempotent after a method's own NMS at the
same IoU) are applied here, so every method's boxes mean the same thing.
"""

from __future__ import annotations

import csv
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.paths import expand_image_paths
from visiontune.detect.annotations import load_annotations
from visiontune.detect.evaluation import detection_metrics
from visiontune.detect.methods import load_detector
from visiontune.detect.report import write_report
from visiontune.detect.types import Detections, Detector, ImageTargets
from visiontune.errors import UserError, require_some_read
from visiontune.io import write_text_atomic
from visiontune.runformat import SPLITS_FILE, read_meta

NMS_IOU = 0.5
DETECT_BATCH = 8  # images decoded and detected at a time
EVAL_DIR = "eval"
SPLITS_FIELDS = ["image", "split", "width", "height", "label", "x1", "y1", "x2", "y2"]


def postprocess(detections: Detections, threshold: float = 0.0, iou: float = NMS_IOU) -> Detections:
    """Boxes scoring at least `threshold`, per-class NMS, highest score first."""
    keep = detections.scores >= threshold
    boxes, scores, labels = (torch.from_numpy(a[keep]) for a in (detections.boxes, detections.scores, detections.labels))
    order = batched_nms(boxes, scores, labels, iou).numpy()
    return Detections(boxes.numpy()[order], scores.numpy()[order], labels.numpy()[order])


def detect_files(detector: Detector, paths: Sequence[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> tuple[list[int], list[Detections], list[tuple[str, str]], float]:
    """(indices of the readable paths, their detections, (path, reason) of the others, seconds taken)."""
    kept, found, skipped = [], [], []
    started = time.perf_counter()
    for start in range(0, len(paths), DETECT_BATCH):
        images = []
        for i in range(start, min(start + DETECT_BATCH, len(paths))):
            try:
                images.append(np.asarray(load_rgb(paths[i], max_pixels)))
                kept.append(i)
            except ImageLoadError as exc:
                skipped.append((str(paths[i]), str(exc)))
        if images:
            found += [postprocess(d) for d in detector.detect_batch(images)]
    return kept, found, skipped, time.perf_counter() - started


class DetectorRun:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        self.metadata = read_meta(self.dir, "detector")
        if not isinstance(self.metadata.get("classes"), list) or "threshold" not in self.metadata:
            raise UserError(f"{self.dir}/model.json is damaged: no classes or threshold")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.dir)!r})"

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.metadata["classes"]]

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @functools.cached_property
    def detector(self) -> Detector:
        return load_detector(self.dir, self.metadata)

    def split_targets(self, split: str) -> list[ImageTargets]:
        """The true boxes of the images RUN/splits.csv puts in `split`."""
        path = self.dir / SPLITS_FILE
        if not path.is_file():
            raise UserError(f"{self.dir} has no {SPLITS_FILE}: evaluate it on annotations (--boxes, --images)")
        images: dict[str, dict] = {}
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["split"] != split:
                    continue
                entry = images.setdefault(row["image"], {"size": (int(row["width"]), int(row["height"])),
                                                         "boxes": [], "labels": []})
                if row["label"]:
                    entry["boxes"].append([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
                    entry["labels"].append(self.classes.index(row["label"]))
        return [ImageTargets(Path(p), e["size"][0], e["size"][1], np.array(e["boxes"], dtype=np.float32), e["labels"])
                for p, e in images.items()]

    def predict(self, images: Sequence[str | Path], score_threshold: float | None = None
                ) -> tuple[list[dict], list[tuple[str, str]]]:
        """Rows image,label,score,x1,y1,x2,y2 of the boxes at or above the threshold (the run's
        unless given), and (path, reason) of the files that could not be read (none readable: UserError)."""
        paths = expand_image_paths([str(p) for p in images])
        threshold = self.threshold if score_threshold is None else score_threshold
        kept, found, skipped, _ = detect_files(self.detector, paths)
        require_some_read(len(kept), len(skipped), "detected")
        rows = []
        for i, detections in zip(kept, found):
            shown = postprocess(detections, threshold)
            rows += [{"image": paths[i], "label": self.classes[int(label)], "score": round(float(score), 4),
                      **{k: round(float(v), 1) for k, v in zip(("x1", "y1", "x2", "y2"), box)}}
                     for box, score, label in zip(shown.boxes, shown.scores, shown.labels)]
        return rows, skipped

    def evaluate(self, split: str = "test", annotations: str | Path | None = None, images: str | Path | None = None,
                 fmt: str = "auto", report: bool = True) -> dict:
        """mAP@0.5 (95% CI), mAP@[.5:.95], per-class AP, recall and precision at the run's threshold
        and images/s on `split` (or on `annotations` for `images`), into RUN/eval/<split>/."""
        problems = []
        if annotations is not None or images is not None:
            if annotations is None or images is None:
                raise UserError("give both --boxes ANNOTATIONS and --images FOLDER, or neither")
            dataset = load_annotations(annotations, images, fmt, classes=self.classes)
            targets, problems, split = dataset.images, dataset.problems, "annotations"
        else:
            targets = self.split_targets(split)
        if not targets:
            raise UserError(f"{self.dir} has no {split} images; choose another --split (train, val or test)")
        kept, found, skipped, seconds = detect_files(self.detector, [t.path for t in targets])
        if not kept:
            raise UserError(f"none of the {len(targets)} {split} images could be read")
        targets = [targets[i] for i in kept]
        metrics, matches = detection_metrics(found, targets, self.classes, self.threshold)
        result = {"split": split, "method": self.metadata["method"], "images": len(targets), "metrics": metrics,
                  "images_per_second": len(targets) / seconds if seconds > 0 else None,
                  "skipped": [{"path": p, "reason": r} for p, r in skipped],
                  "annotation_problems": [{"source": p.source, "reason": p.reason} for p in problems]}
        if split in ("train", "val"):
            result["note"] = (f"the {split} images {'chose the threshold and the kept epoch' if split == 'val' else 'were trained on'}:"
                              " these numbers are optimistic")
        out = self.dir / EVAL_DIR / split
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2))
        if report:
            write_report(self, result, found, targets, matches, out)
        return result


def load(directory: str | Path) -> DetectorRun:
    return DetectorRun(directory)
