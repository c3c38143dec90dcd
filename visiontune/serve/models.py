"""The models a server holds: a classifier run, an anomaly model, a caption run or a detector run
behind one small interface.

Each turns uploaded bytes into a tensor (`decode`, safe in any thread), a batch of tensors into
one JSON-ready result per image (`predict`: the same inference plan and decision rules as
`visiontune predict`), and, on request, an overlay PNG: Grad-CAM for a classifier, the heat map
for an anomaly model, the decoder's attention over the image (averaged over the generated words)
for a captioner, the boxes drawn on the image for a detector. `load_served` tells them apart by
the directory's model.json.
"""

from __future__ import annotations

import io
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from visiontune.anomaly.components.anomaly_map import heatmap_overlay
from visiontune.anomaly.data import GOOD, anomaly_transform
from visiontune.anomaly.workflow import load as load_anomaly_model
from visiontune.caption.encoder import to_memory
from visiontune.caption.run import CaptionRun, generate
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import load_rgb_bytes
from visiontune.detect.run import load as load_detector_run
from visiontune.detect.run import postprocess
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.evaluation.predict import prediction_row, raw_and_shown_probabilities
from visiontune.explain.cam import gradcam
from visiontune.explain.overlay import model_view, overlay
from visiontune.inference.engine import (
    forward,
    load_for_inference,
    plan_inference,
    prepare_model,
)
from visiontune.inference.onnx import checkpoint_key
from visiontune.io import read_json
from visiontune.models.classifier_run import ClassifierRun
from visiontune.ood.detector import PRIMARY
from visiontune.ood.fit import load_ood
from visiontune.runformat import ANOMALY_WEIGHTS_FILE, CHECKPOINT_DIR, META_FILE

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Decoded:
    """One upload, ready for the model; `image` is kept only when an overlay was asked for."""

    tensor: torch.Tensor
    image: Image.Image | None = None


@dataclass
class Prediction:
    body: dict  # JSON-ready fields
    anomaly_map: np.ndarray | None = None  # what the overlay draws: the anomaly map, or a captioner's attention


class ServedModel(ABC):
    """A loaded model under `name`; `version` is the first 12 hex digits of its weights' SHA-256."""

    kind: str

    def __init__(self, name: str, directory: Path, weights: Path, max_pixels: int) -> None:
        self.name, self.directory, self.max_pixels = name, directory, max_pixels
        self.version = checkpoint_key(weights)["sha256"][:12]

    def decode(self, data: bytes, keep_image: bool = False) -> Decoded:
        """Raises visiontune.data.images.ImageLoadError with the reason for unusable bytes."""
        image = load_rgb_bytes(data, self.max_pixels)
        return Decoded(self.transform(image), image if keep_image else None)

    def transform(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)  # each kind sets its evaluation transform as `_transform`

    def collate(self, tensors: list[torch.Tensor]):
        """One batch for `predict` from the decoded tensors (same-sized for every kind but detectors)."""
        return torch.stack(tensors)

    @abstractmethod
    def predict(self, batch: torch.Tensor, top_k: int = 3) -> list[Prediction]: ...

    @abstractmethod
    def overlay_png(self, decoded: Decoded, prediction: Prediction) -> bytes: ...

    @abstractmethod
    def card(self) -> dict: ...

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run each batch size once, so the first real requests do not pay for allocation."""
        size = self.input_size
        for n in batch_sizes:
            self.predict(torch.zeros(n, 3, size, size))

    @property
    @abstractmethod
    def input_size(self) -> int: ...


class ServedClassifier(ServedModel):
    kind = "classifier"

    def __init__(self, name: str, directory: Path, device: str = "auto", backend: str | None = None,
                 quantize: str | None = None, max_batch_size: int = 8, threads: int | None = None) -> None:
        self.run = ClassifierRun(directory)
        super().__init__(name, self.run.dir, self.run.checkpoint_path("best"), self.run.config.max_pixels)
        plan = plan_inference(resolve_device(device), max_batch_size, None, backend, quantize, threads, workers=0)
        model, self.plan = load_for_inference(self.run, plan, fallback=backend is None and quantize is None, spin=False)
        self.model = prepare_model(model, self.plan)
        self.labels = self.run.labels
        self._transform = self.run.preprocessing.eval_transform()
        # read once: what the server answers with does not change under it when evaluate rewrites them
        self._threshold = self.run.threshold if len(self.labels) == 2 else None
        self._loss, self._temperature = self.run.metadata["loss"], self.run.temperature
        self._ood = load_ood(self.run)  # every answer carries `ood_score` and `ood` when fitted
        self._torch_model = None  # for Grad-CAM, loaded on the first overlay request
        self._cam_lock = threading.Lock()

    @property
    def input_size(self) -> int:
        return self.run.preprocessing.input_size

    def predict(self, batch: torch.Tensor, top_k: int = 3) -> list[Prediction]:
        if self._ood is None:
            logits, flags = forward(self.model, batch, self.plan), [{}] * len(batch)
        else:
            logits, features = forward(self.model, batch, self.plan, features=True)
            flags = self._ood.columns(self._ood.score(logits, features))
        raw, shown = raw_and_shown_probabilities(logits, self._loss, self._temperature)
        k = max(1, min(top_k, len(self.labels)))
        results = []
        for p, q, flag in zip(shown, raw, flags):
            row = prediction_row(p, q, self.labels, k, self._threshold)
            top = [{"label": row[f"top{r}_label"], "probability": row[f"top{r}_probability"]} for r in range(1, k + 1)]
            results.append(Prediction({"label": row["label"], "probability": row["probability"], "top_k": top, **flag}))
        return results

    def overlay_png(self, decoded: Decoded, prediction: Prediction) -> bytes:
        """Grad-CAM of the predicted class over the image the model saw."""
        with self._cam_lock:
            if self._torch_model is None:
                self._torch_model = self.run.load_model("best").eval()
            batch = decoded.tensor.unsqueeze(0)
            target = self.labels.index(prediction.body["label"])
            heat = gradcam(self._torch_model, batch, [target])
        return _png(overlay(model_view(batch, self.run.preprocessing)[0], heat[0]))

    def card(self) -> dict:
        summary = _optional_summary(self.run)
        return {
            "name": self.name, "kind": self.kind, "version": self.version, "backbone": self.run.metadata["model"],
            "classes": self.labels, "preprocessing": self.run.preprocessing.to_dict(),
            "threshold": self._threshold, "temperature": self._temperature,
            "ood": None if self._ood is None else {
                "primary": PRIMARY, "threshold": self._ood.thresholds_[PRIMARY], "keep": self._ood.keep},
            "metrics": {split: summary.get(split) for split in ("val", "test")},
            "kept": summary.get("kept"), "inference": self.plan.describe(),
        }


class ServedAnomalyModel(ServedModel):
    kind = "anomaly"

    def __init__(self, name: str, directory: Path, device: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = load_anomaly_model(directory, device=device, workers=0, max_pixels=max_pixels)
        super().__init__(name, Path(directory), Path(directory) / ANOMALY_WEIGHTS_FILE, max_pixels)
        self._transform = anomaly_transform(self.model.preprocessing)

    @property
    def input_size(self) -> int:
        return self.model.image_size

    def predict(self, batch: torch.Tensor, top_k: int = 3) -> list[Prediction]:
        scores, maps = self.model.score_images(batch)
        threshold = self.model.threshold_
        return [
            Prediction({"score": float(score), "threshold": threshold,
                        "decision": "anomalous" if score >= threshold else GOOD}, anomaly_map)
            for score, anomaly_map in zip(scores, maps)
        ]

    def overlay_png(self, decoded: Decoded, prediction: Prediction) -> bytes:
        return _png(heatmap_overlay(decoded.image, prediction.anomaly_map, *self.model.map_range_))

    def card(self) -> dict:
        model = self.model
        return {
            "name": self.name, "kind": self.kind, "version": self.version, "method": model.detector.method,
            "backbone": model.extractor.backbone, "layers": model.extractor.layers,
            "preprocessing": model.preprocessing.to_dict(), "threshold": model.threshold_,
            "threshold_rule": model.threshold_rule_, "scoring": model.scoring.to_dict(),
            "fit": {k: model.fit_info_.get(k) for k in ("train_images", "holdout_images", "defect_images")},
        }


class ServedCaptioner(ServedModel):
    kind = "caption"
    beam = 3

    def __init__(self, name: str, directory: Path, device: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.run = CaptionRun(directory)
        self.device = resolve_device(device)
        self.encoder = self.run.encoder().to(self.device).folded()
        self.decoder = self.run.decoder().to(self.device)
        super().__init__(name, Path(directory), Path(directory) / CHECKPOINT_DIR / "best.safetensors", max_pixels)
        self._transform = self.run.preprocessing.eval_transform()

    @property
    def input_size(self) -> int:
        return self.run.preprocessing.input_size

    def predict(self, batch: torch.Tensor, top_k: int = 3) -> list[Prediction]:
        """Beam-searched captions; `anomaly_map` carries the mean attention grid for the overlay."""
        run, vocab = self.run, self.run.vocab
        with torch.inference_mode():
            memory = to_memory(self.encoder(batch.to(self.device)), run.spec)
            generated = generate(self.decoder, vocab, memory, self.beam, run.metadata["decoder"]["max_length"],
                                 self.device)
        predictions = []
        for tokens, attention, score in zip(generated.tokens, generated.attention, generated.scores):
            grid = (attention.mean(dim=0) if len(attention) else torch.zeros(attention.shape[-1]))
            predictions.append(Prediction({"caption": vocab.decode(tokens), "score": score,
                                           "words": [vocab.tokenizer.id_to_token(t) for t in tokens]},
                                          grid.reshape(run.spec.grid).numpy()))
        return predictions

    def overlay_png(self, decoded: Decoded, prediction: Prediction) -> bytes:
        grid = prediction.anomaly_map
        return _png(heatmap_overlay(decoded.image, grid, 0.0, float(grid.max()) or 1.0))

    def card(self) -> dict:
        meta = self.run.metadata
        return {"name": self.name, "kind": self.kind, "version": self.version, "encoder": meta["encoder"],
                "decoder": meta["decoder"], "preprocessing": meta["preprocessing"], "beam": self.beam}


class ServedDetector(ServedModel):
    """A detector run: images keep their own size (boxes are in their pixels), so a batch is a list."""

    kind = "detector"

    def __init__(self, name: str, directory: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.run = load_detector_run(directory)
        self.detector = self.run.detector
        weights = next((p for p in sorted(Path(directory).rglob("*.safetensors")) if "proposals" not in p.parts),
                       Path(directory) / META_FILE)
        super().__init__(name, Path(directory), weights, max_pixels)

    def transform(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8))  # H x W x 3, as detect_batch takes it

    def collate(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors

    @property
    def input_size(self) -> int:
        return 64  # warm-up only: a detector takes any size

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        for n in batch_sizes:
            self.predict([torch.zeros(self.input_size, self.input_size, 3, dtype=torch.uint8)] * n)

    def predict(self, batch: list[torch.Tensor], top_k: int = 3) -> list[Prediction]:
        """The boxes at or above the run's threshold, after its NMS: what `detect predict` writes."""
        classes, threshold = self.run.classes, self.run.threshold
        found = self.detector.detect_batch([t.numpy() for t in batch])
        predictions = []
        for detections in found:
            shown = postprocess(detections, threshold)
            boxes = [{"label": classes[int(label)], "score": round(float(score), 4),
                      "box": [round(float(v), 1) for v in box]}
                     for box, score, label in zip(shown.boxes, shown.scores, shown.labels)]
            predictions.append(Prediction({"boxes": boxes, "count": len(boxes), "threshold": threshold}))
        return predictions

    def overlay_png(self, decoded: Decoded, prediction: Prediction) -> bytes:
        image = decoded.image.copy()
        draw = ImageDraw.Draw(image)
        for found in prediction.body["boxes"]:
            draw.rectangle(found["box"], outline=(255, 64, 0), width=max(1, round(min(image.size) / 150)))
            draw.text((found["box"][0] + 2, found["box"][1] + 1), f"{found['label']} {found['score']:.2f}",
                      fill=(255, 64, 0))
        return _png(image)

    def card(self) -> dict:
        meta = self.run.metadata
        return {"name": self.name, "kind": self.kind, "version": self.version, "method": meta["method"],
                "classes": self.run.classes, "threshold": self.run.threshold}


def load_served(directory: str | Path, name: str | None = None, **options) -> ServedModel:
    """The classifier run or anomaly model in `directory`, served as `name` (default: its folder name)."""
    directory = Path(directory).expanduser()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{directory} is not a visiontune run or anomaly model directory (no {META_FILE})")
    name = name or directory.resolve().name
    if not NAME.match(name):
        raise UserError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it is part of a URL); "
                        f"give one with NAME=DIR")
    kind = read_json(meta_path).get("kind") or ("anomaly" if (directory / ANOMALY_WEIGHTS_FILE).is_file() else "classifier")
    if kind == "anomaly":  # the torch plan only: no ONNX export of a detector, batches as they come
        return ServedAnomalyModel(name, directory, device=options.get("device", "auto"), threads=options.get("threads"))
    if kind == "caption":
        return ServedCaptioner(name, directory, device=options.get("device", "auto"), threads=options.get("threads"))
    if kind == "detector":  # the device is the run's own (its method's options)
        return ServedDetector(name, directory, threads=options.get("threads"))
    if kind == "classifier":
        return ServedClassifier(name, directory, **options)
    raise UserError(f"{directory} holds a {kind!r} artifact, which `serve` cannot serve yet")


def _optional_summary(run: ClassifierRun) -> dict:
    try:
        return run.summary
    except UserError:
        return {}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
