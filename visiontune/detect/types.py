"""The values every part of detection passes around: ground-truth boxes per image, a parsed
annotation set with the problems found in it, and one image's predicted boxes.

Boxes are float32 `[N, 4]` arrays in absolute pixels, `x1, y1, x2, y2` (torchvision's and
torchmetrics' `xyxy`), in the image as decoded with its EXIF rotation applied. Labels are int64
indices into the set's `classes` (no background class: detectors that need one add it inside).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np


def _boxes(value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    return array.reshape(-1, 4)


def _labels(value) -> np.ndarray:
    return np.asarray(value, dtype=np.int64).reshape(-1)


@dataclass(frozen=True)
class ImageTargets:
    """The true boxes of one image."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    labels: np.ndarray  # int64 [N], indices into DetectionSet.classes

    def __post_init__(self):
        object.__setattr__(self, "boxes", _boxes(self.boxes))
        object.__setattr__(self, "labels", _labels(self.labels))
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.path}: {len(self.boxes)} boxes but {len(self.labels)} labels")


@dataclass(frozen=True)
class AnnotationProblem:
    """One annotation that was dropped, and why (box outside the image, zero area, unknown class,
    missing image, unparseable line); listed to the user, never fatal on its own."""

    source: str  # the annotation file, with a line or object number where there is one
    reason: str


@dataclass
class DetectionSet:
    """A parsed annotation set: class names (their order fixes the label indices), the usable
    images with their boxes (an image with no boxes is a valid all-background image), and what was
    dropped."""

    classes: list[str]
    images: list[ImageTargets]
    problems: list[AnnotationProblem] = field(default_factory=list)


@dataclass(frozen=True)
class Detections:
    """One image's predicted boxes, highest score first."""

    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self):
        object.__setattr__(self, "boxes", _boxes(self.boxes))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "labels", _labels(self.labels))

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0))


class Detector(Protocol):
    """What `detect predict / evaluate` and the threshold choice need from a fitted detector of any
    method (R-CNN regions, Faster R-CNN). Images are decoded by the caller (`data.images.load_rgb`,
    so unreadable files are listed there) and passed as RGB uint8 `H x W x 3` arrays. No score
    threshold is applied here beyond the method's own floor: the run's threshold is applied by the
    caller."""

    classes: list[str]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]: ...
