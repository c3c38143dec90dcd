"""An anomaly model's whole scoring path as one ONNX graph, and ONNX Runtime scoring with it.

Everything `AnomalyModel.score` computes after preprocessing is torch: the backbone's feature maps,
the detector's patch embedding and patch scores (PaDiM's Mahalanobis distances, PatchCore's
distance to the nearest memory-bank patch, reverse distillation's teacher-student cosine
distance), the upsampling and Gaussian blur of the map (two constant matrices,
components/anomaly_map.py) and the image score (top-mean, max, or PatchCore's re-weighted
maximum). So the graph is the model, checked against the eager code on synthetic images before
it is used or deployed. On a small CPU ONNX Runtime scores with it 1.8-2.7x faster end to end
than eager torch (docs/benchmarks.md, "Anomaly inference through ONNX Runtime"), so `load` uses it
there.

PatchCore scores each patch against the whole bank at once here (the eager code goes block by
block): memory is patches x bank size x 4 bytes per image, e.g. 64 MB for 1,024 patches and a
16,384-patch bank, so `OnnxScorer` feeds the graph as many images at a time as GRAPH_BYTES allow.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from visiontune.anomaly.base import AnomalyModel
from visiontune.anomaly.components.coreset import nearest_neighbours
from visiontune.anomaly.data import anomaly_transform
from visiontune.anomaly.patchcore import PatchCore
from visiontune.anomaly.reverse_distillation import ReverseDistillation
from visiontune.data.images import load_rgb
from visiontune.errors import UserError, first_line
from visiontune.inference.onnx import (
    INPUT,
    OnnxModel,
    checkpoint_key,
    export_model,
    input_array,
    is_current,
    write_key,
)
from visiontune.io import write_text_atomic
from visiontune.runformat import ANOMALY_WEIGHTS_FILE, META_FILE

OUTPUTS = ("scores", "maps")
TOLERANCE = 1e-3  # relative to the largest reference score (map value): float32 round-off is ~1e-6
CHECK_IMAGES = 2
REFERENCE = "AnomalyModel.eager_scores (torch eager fp32)"
GRAPH_BYTES = 256 << 20  # PatchCore's patch-to-bank distances held at once by one run of the graph


class ScoringGraph(nn.Module):
    """images [B, 3, S, S], normalised -> (image scores [B], maps [B, S, S]) as AnomalyModel.score."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.extractor = model.extractor  # not the folded copy: its oneDNN convolutions do not export
        self.detector, self.scoring, self.size = model.detector, model.scoring, model.image_size
        if isinstance(self.detector, PatchCore):
            bank = self.detector.memory_bank_
            squared = bank.pow(2).sum(-1, keepdim=True)
            # coreset.squared_distances' form, in one block: |q|^2 - 2 q.r + |r|^2 as one matrix product
            self.register_buffer("padded_bank", torch.cat([bank, torch.ones_like(squared), squared], -1).mT)
            k = min(self.detector.num_neighbors, len(bank))
            self.register_buffer("bank_neighbours", nearest_neighbours(bank, bank, k)[1] if k >= 2 else None)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.extractor(images)
        if isinstance(self.detector, ReverseDistillation):  # its score splits the embedding back into `maps`
            patch_scores, own_scores = self.detector.score_levels(maps, maps[0].shape[-2:]), None
        elif isinstance(self.detector, PatchCore):
            patch_scores, own_scores = self._patchcore(self.detector.embed(maps))
        else:
            patch_scores, own_scores = self.detector.score(self.detector.embed(maps))
        return self.scoring.apply(patch_scores, own_scores, self.size)

    def _patchcore(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PatchCore.score without its Python loops over blocks and images, which a trace would freeze."""
        batch, channels, height, width = embedding.shape
        features = embedding.permute(0, 2, 3, 1).reshape(-1, channels)
        squared_norms = features.pow(2).sum(-1, keepdim=True)
        padded = torch.cat([features.mul(-2), squared_norms, torch.ones_like(squared_norms)], -1)
        squared = (padded @ self.padded_bank).view(batch, height * width, -1)
        distances = squared.amin(dim=2).clamp_min(0).sqrt()
        patch_scores = distances.view(batch, height, width)
        if self.scoring.image_score != "detector":
            return patch_scores, None
        # the paper's re-weighting of each image's worst patch (PatchCore._isolation_weight)
        worst = distances.argmax(dim=1)
        worst_score = distances.gather(1, worst[:, None])[:, 0]
        if self.bank_neighbours is None:
            return patch_scores, worst_score
        worst_patch = features.view(batch, height * width, channels).gather(
            1, worst[:, None, None].expand(batch, 1, channels))[:, 0]
        nearest = squared.gather(1, worst[:, None, None].expand(batch, 1, squared.shape[2]))[:, 0].argmin(dim=1)
        support = self.detector.memory_bank_[self.bank_neighbours[nearest]]
        weight = 1 - torch.softmax(torch.linalg.vector_norm(worst_patch[:, None] - support, dim=-1), dim=1)[:, 0]
        return patch_scores, worst_score * weight


class OnnxScorer:
    """Decoded image batches -> (scores [B], maps [B, S, S]) as numpy, through the exported graph."""

    def __init__(self, path: str | Path, model: AnomalyModel, threads: int, spin: bool = True) -> None:
        self.onnx = OnnxModel(path, threads, spin)
        self.images_per_run = images_per_run(model)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        batch = input_array(images)
        parts = [self.onnx.session.run(list(OUTPUTS), {INPUT: batch[start:start + self.images_per_run]})
                 for start in range(0, len(batch), self.images_per_run)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def images_per_run(model: AnomalyModel) -> int:
    """Images per run of the graph within GRAPH_BYTES of PatchCore distances (any number otherwise)."""
    if not isinstance(model.detector, PatchCore):
        return 1 << 30
    with torch.inference_mode():
        example = torch.zeros(1, 3, model.image_size, model.image_size, device=model.device)
        patches = model.detector.embed(model.extractor(example))[0, 0].numel()
    return max(1, GRAPH_BYTES // (patches * (len(model.detector.memory_bank_) + 2) * 4))


def exported_graph(model: AnomalyModel, directory: str | Path, recheck: bool = False) -> tuple[Path, dict]:
    """DIR/export/model.onnx of `model` (on the CPU, loaded from DIR), exported again when the
    model's files changed, and its check against the eager code (`check_onnx`), made on export or
    with `recheck`; a failed check is a UserError."""
    directory = Path(directory).expanduser()
    key = {name: checkpoint_key(directory / name) for name in (ANOMALY_WEIGHTS_FILE, META_FILE)}
    out = directory / "export" / "model.onnx"
    current = is_current(out, key)
    if current and not recheck:
        try:
            check = json.loads(_check_path(out).read_text())
            if check.get("passed") is True:
                return out, check
        except (OSError, ValueError):  # no check beside the graph, or a damaged one: check it now
            pass
    if not current:
        graph = ScoringGraph(model)
        with torch.inference_mode():  # fills anomaly_map's cache of smoothing matrices, which a trace
            graph(torch.zeros(1, 3, model.image_size, model.image_size))  # would record as float64 ops
        try:
            export_model(graph, out, model.image_size, outputs=OUTPUTS)
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
            raise UserError(f"the scoring graph of this {model.detector.method} model ({model.extractor.backbone}, "
                            f"{model.image_size} px) does not export to ONNX: {first_line(exc, 300)}") from None
    check = check_onnx(model, out)
    write_key(out, key)  # after the check: a graph that failed it is exported and checked again next time
    return out, check


def check_onnx(model: AnomalyModel, path: Path) -> dict:
    """Scores and maps of the ONNX graph against the eager code on CHECK_IMAGES synthetic images;
    writes PATH.check.json; a difference beyond TOLERANCE is a UserError."""
    session = OnnxModel(path).session
    with tempfile.TemporaryDirectory() as folder:
        paths = _synthetic_images(Path(folder), model.image_size)
        transform = anomaly_transform(model.preprocessing)
        batch = torch.stack([transform(load_rgb(p, model.max_pixels)) for p in paths])
    reference_scores, reference_maps = model.eager_scores(batch)
    scores, maps = session.run(list(OUTPUTS), {INPUT: batch.numpy()})
    check = {"max_abs_diff_scores": float(np.abs(scores - reference_scores).max()),
             "max_abs_diff_maps": float(np.abs(maps - reference_maps).max()),
             "score_scale": float(np.abs(reference_scores).max()), "images": len(paths),
             "inputs": "synthetic images", "reference": REFERENCE, "tolerance": TOLERANCE}
    limit = TOLERANCE * max(1.0, check["score_scale"], float(np.abs(reference_maps).max()))
    check["passed"] = max(check["max_abs_diff_scores"], check["max_abs_diff_maps"]) <= limit
    write_text_atomic(_check_path(path), json.dumps(check, indent=2) + "\n")
    if not check["passed"]:
        raise UserError(f"{path} does not match the model: max |difference| {check['max_abs_diff_scores']:.3g} "
                        f"(scores), {check['max_abs_diff_maps']:.3g} (maps) > {limit:.3g}; do not deploy it")
    return check


def _check_path(path: Path) -> Path:
    return path.with_name(path.name + ".check.json")


def _synthetic_images(folder: Path, size: int) -> list[Path]:
    """Seeded smooth noise with a bright line, different per image: something to score, not data."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(CHECK_IMAGES):
        low = rng.normal(128, 30, (8, 8)).astype(np.float32)
        grey = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC))
        grey = grey + rng.normal(0, 8, (size, size))
        grey[size // 3 + i * 5, size // 4:] = 250
        path = folder / f"check{i}.png"
        Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB").save(path)
        paths.append(path)
    return paths
