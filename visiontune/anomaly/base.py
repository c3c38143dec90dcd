"""The glue around a detector: images in, backbone features, scores and maps out; save and reload.

A detector (PatchCore, PaDiM) is fitted once from a stream of patch embeddings, with no gradients
and no trainer. `AnomalyModel` feeds it from image files, sets the decision threshold from held-out
good images, and saves everything as one safetensors file (backbone weights cut after the last
used layer, detector tensors) plus one JSON file, so a model directory reloads anywhere, offline,
to the same scores.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import safetensors.torch
import torch
from torch.utils.data import DataLoader

from visiontune._version import __version__
from visiontune.anomaly.calibration import (
    cached_embeddings,
    out_of_fold_scores,
    score_range,
    warn_if_too_few,
)
from visiontune.anomaly.components.anomaly_map import LEGACY_SCORING, MapScoring
from visiontune.anomaly.components.threshold import (
    GOOD_QUANTILE,
    TARGET_RECALL,
    choose_threshold,
    flagged_share,
)
from visiontune.anomaly.data import anomaly_transform
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.dataset import ImageFiles, collate_image_files
from visiontune.data.transforms import Preprocessing
from visiontune.data.validate import Skipped
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.io import atomic_write, write_text_atomic
from visiontune.models.extractor import FeatureExtractor
from visiontune.runformat import (
    ANOMALY_WEIGHTS_FILE,
    LEGACY_ANOMALY_FORMAT,
    META_FILE,
    meta_fields,
    read_meta,
)


class PatchDetector(ABC):
    """A fit-once detector over patch embeddings [B, C, h, w] from a backbone's feature maps."""

    method: ClassVar[str]

    @abstractmethod
    def params(self) -> dict:
        """Constructor arguments, JSON-serialisable."""

    @abstractmethod
    def embed(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Patch embeddings [B, C, h, w] from the backbone's maps (finest first)."""

    @abstractmethod
    def fit(self, embeddings: Iterable[torch.Tensor]) -> PatchDetector:
        """Fit from a stream of embedding batches of good images, consuming it once."""

    @abstractmethod
    def score(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch scores [B, h, w] and image scores [B], or None for "the anomaly map's maximum"."""

    @abstractmethod
    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        """Everything `fit` learned, for saving."""

    @abstractmethod
    def restore(self, tensors: dict[str, torch.Tensor]) -> PatchDetector:
        """Set the fitted attributes from `fitted_tensors` of an earlier fit."""

    @abstractmethod
    def to(self, device: torch.device) -> PatchDetector: ...


@dataclass
class Scores:
    """Readable images in input order with their scores [n] and maps [n, size, size]."""

    paths: list[Path]
    scores: np.ndarray
    maps: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)


class AnomalyModel:
    """Backbone + detector + preprocessing + map scoring; fitted: threshold_, threshold_rule_,
    map_range_, fit_info_."""

    def __init__(self, extractor: FeatureExtractor, detector: PatchDetector, preprocessing: Preprocessing,
                 batch_size: int = 16, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 device: str = "auto", scoring: MapScoring | None = None) -> None:
        self.device = resolve_device(device)
        self.extractor = extractor.to(self.device)
        self._inference_extractor = self.extractor.folded()
        self.detector = detector
        self.preprocessing = preprocessing
        self.scoring = scoring or MapScoring()
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self._graph: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]] | None = None
        self.backend = "torch"  # what scores decoded images: "torch", or "onnx" after use_graph

    @property
    def image_size(self) -> int:
        return self.preprocessing.input_size

    def fit(self, train: Sequence[Path], holdout: Sequence[Path], val_defects: Sequence[Path] = (),
            false_alarm_rate: float = 0.01, folds: int = 0, seed: int = 0,
            target_recall: float | None = None) -> AnomalyModel:
        """Fit the detector on `train`, then the threshold on held-out good (and validation defect)
        images by components/threshold.py's rules.

        With `folds` (and no `holdout`), the good scores behind the threshold are out-of-fold: each
        training image scored by a detector fitted on the other folds (calibration.py), and the
        detector kept is then fitted on all of them.
        """
        started = time.perf_counter()
        skipped: list[Skipped] = []
        stats = {"load_s": 0.0, "features_s": 0.0, "images": 0}
        if folds:
            embeddings = cached_embeddings(self, train, skipped, stats)
            self.detector.fit(embeddings.batches(range(len(embeddings))))
        else:
            self.detector.fit(self._embeddings(train, skipped, stats))
        train_images = stats.pop("images")
        stats["detector_s"] = time.perf_counter() - started - stats["load_s"] - stats["features_s"]
        calibration_started = time.perf_counter()
        if folds:
            good_scores, self.map_range_ = out_of_fold_scores(self, embeddings, folds, seed)
            calibration = {"method": f"{folds}-fold out-of-bank scores of the training images", "folds": folds}
        else:
            good_scores, self.map_range_ = self._score_good(holdout, skipped)
            calibration = {"method": "held-out good images"}
        calibration["scores"] = len(good_scores)
        bad = self.score(val_defects) if val_defects else None
        if bad is not None and not len(bad.scores):
            raise UserError(f"none of the {len(val_defects)} validation defect images could be read "
                            f"({bad.skipped[0].path}: {bad.skipped[0].reason})")
        self._set_threshold(good_scores, bad.scores if bad else None, false_alarm_rate, target_recall)
        stats["threshold_s"] = time.perf_counter() - calibration_started
        stats["total_s"] = time.perf_counter() - started
        skipped += bad.skipped if bad else []
        self.fit_info_ = {
            "train_images": train_images, "holdout_images": 0 if folds else len(good_scores),
            "calibration": calibration,
            "defect_images": len(bad.paths) if bad else 0, "skipped": [vars(s) for s in skipped],
            "timings": {k: round(v, 3) for k, v in stats.items()},
        }
        return self

    def _set_threshold(self, good_scores: np.ndarray, defect_scores: np.ndarray | None, false_alarm_rate: float,
                       target_recall: float | None) -> None:
        """threshold_ and threshold_rule_: the rule with what it rests on and, for a target recall,
        the recall and false-alarm rate it reached on validation."""
        self.threshold_, rule = choose_threshold(good_scores, defect_scores, false_alarm_rate, target_recall)
        self.threshold_rule_ = {"rule": rule, "calibration_scores": len(good_scores)}
        if rule == GOOD_QUANTILE:
            self.threshold_rule_["false_alarm_rate"] = false_alarm_rate
            warn_if_too_few(len(good_scores), false_alarm_rate)
        elif rule == TARGET_RECALL:
            self.threshold_rule_ |= {
                "target_recall": target_recall, "validation_defect_images": len(defect_scores),
                "validation_recall": flagged_share(defect_scores, self.threshold_),
                "validation_false_alarm_rate": flagged_share(good_scores, self.threshold_),
            }

    def _score_good(self, holdout: Sequence[Path], skipped: list[Skipped]) -> tuple[np.ndarray, tuple[float, float]]:
        """Held-out scores and the heat-map range (`score_range`)."""
        parts = []
        for part in self.score_batches(holdout):
            skipped += part.skipped
            parts += [(part.scores, part.maps)] if len(part.scores) else []
        if not parts:
            raise UserError("none of the held-out good images could be read; see the skipped files")
        return score_range(parts)

    def _loader(self, paths: Sequence[Path]) -> DataLoader:
        dataset = ImageFiles(paths, anomaly_transform(self.preprocessing), self.max_pixels,
                             draft_size=self.preprocessing.input_size)  # the transform resizes to it
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers,
                          collate_fn=collate_image_files, pin_memory=self.device.type == "cuda")

    def _batches(self, paths: Sequence[Path], skipped: list[Skipped], stats: dict | None = None
                 ) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Readable image batches on the device with their indices; unreadable files into `skipped`."""
        batches = iter(self._loader(paths))
        while True:
            waited = time.perf_counter()
            try:
                images, indices, bad = next(batches)
            except StopIteration:
                return
            if stats is not None:
                stats["load_s"] += time.perf_counter() - waited
            skipped += [Skipped(str(paths[i]), reason) for i, reason in bad]
            if images is not None:
                yield images.to(self.device, non_blocking=True), indices

    @torch.inference_mode()
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.embed(self._inference_extractor(images))

    def _embeddings(self, paths: Sequence[Path], skipped: list[Skipped], stats: dict) -> Iterator[torch.Tensor]:
        for images, indices in self._batches(paths, skipped, stats):
            started = time.perf_counter()
            embedding = self._embed(images)
            stats["features_s"] += time.perf_counter() - started
            stats["images"] += len(indices)
            yield embedding
        if stats["images"] < 2:
            raise UserError(f"fitting needs at least 2 readable good images, got {stats['images']}; see the skipped files")

    @torch.inference_mode()
    def score_batches(self, paths: Sequence[Path]) -> Iterator[Scores]:
        """Scores batch by batch, so any number of images is scored in bounded memory."""
        skipped: list[Skipped] = []
        for images, indices in self._batches(paths, skipped):
            image_scores, maps = self.score_images(images)
            yield Scores([paths[i] for i in indices], image_scores, maps, skipped.copy())
            skipped.clear()
        if skipped:
            yield self._no_scores(skipped)

    @torch.inference_mode()
    def score_embedding(self, detector: PatchDetector, embedding: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and smoothed maps [B, size, size] of `detector` for a batch of embeddings."""
        image_scores, maps = self.scoring.apply(*detector.score(embedding), self.image_size)
        return image_scores.float().cpu().numpy(), maps.float().cpu().numpy()

    @torch.inference_mode()
    def score_images(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores [B] and maps of an already decoded batch [B, 3, size, size] (`anomaly_transform`),
        for callers that hold images rather than paths (the server); through the scoring graph
        when `use_graph` gave one."""
        return self.eager_scores(images) if self._graph is None else self._graph(images)

    @torch.inference_mode()
    def eager_scores(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`score_images` in eager torch, whatever the backend: the reference a graph is checked against."""
        return self.score_embedding(self.detector, self._embed(images.to(self.device)))

    def use_graph(self, graph: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]], backend: str
                  ) -> AnomalyModel:
        """Score decoded batches with `graph` (onnx_scoring.OnnxScorer: the same computation as one
        ONNX Runtime graph, checked against `eager_scores`) instead of eager torch."""
        self._graph, self.backend = graph, backend
        return self

    def score(self, paths: Sequence[Path]) -> Scores:
        parts = list(self.score_batches(paths)) or [self._no_scores([])]
        return Scores([p for part in parts for p in part.paths], np.concatenate([p.scores for p in parts]),
                      np.concatenate([p.maps for p in parts]), [s for part in parts for s in part.skipped])

    def _no_scores(self, skipped: list[Skipped]) -> Scores:
        size = self.image_size
        return Scores([], np.zeros(0, np.float32), np.zeros((0, size, size), np.float32), list(skipped))

    def info(self) -> dict:
        return {
            **meta_fields("anomaly", __version__), "format": LEGACY_ANOMALY_FORMAT, "method": self.detector.method,
            "backbone": self.extractor.backbone, "layers": self.extractor.layers,
            "preprocessing": self.preprocessing.to_dict(), "detector": self.detector.params(),
            "scoring": self.scoring.to_dict(),
            "threshold": self.threshold_, "threshold_rule": self.threshold_rule_,
            "map_range": list(self.map_range_), "fit": self.fit_info_,
        }

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        tensors = {f"extractor.{k}": v for k, v in self.extractor.state_dict().items()}
        tensors |= {f"detector.{k}": v for k, v in self.detector.fitted_tensors().items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(directory / ANOMALY_WEIGHTS_FILE, lambda tmp: safetensors.torch.save_file(tensors, tmp))
        write_text_atomic(directory / META_FILE, json.dumps(self.info(), indent=2) + "\n")
        return directory

    @classmethod
    def restore(cls, info: dict, tensors: dict[str, torch.Tensor], detector: PatchDetector,
                **options) -> AnomalyModel:
        """The model `save` wrote: `info` and `tensors` as read from its files."""
        extractor = FeatureExtractor(info["backbone"], info["layers"])
        extractor.load_state_dict(_with_prefix(tensors, "extractor."))
        detector.restore(_with_prefix(tensors, "detector."))
        model = cls(extractor, detector, Preprocessing.from_dict(info["preprocessing"]), scoring=_saved_scoring(info),
                    **options)
        model.detector.to(model.device)
        model.threshold_, model.threshold_rule_ = info["threshold"], info["threshold_rule"]
        model.map_range_, model.fit_info_ = tuple(info["map_range"]), info["fit"]
        return model


def read_model_files(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory).expanduser()
    info = read_meta(directory, "anomaly")
    if not (directory / ANOMALY_WEIGHTS_FILE).is_file():
        raise UserError(f"{directory} is not a complete anomaly model directory (no {ANOMALY_WEIGHTS_FILE})")
    try:
        tensors = safetensors.torch.load_file(str(directory / ANOMALY_WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise UserError(f"{directory} holds a damaged model file: {exc}") from None
    return info, tensors


def _saved_scoring(info: dict) -> MapScoring:
    if "scoring" not in info:
        return LEGACY_SCORING
    try:
        return MapScoring(**info["scoring"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"the model's {META_FILE} has a damaged 'scoring' entry: {exc}") from None


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
