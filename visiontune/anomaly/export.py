"""An anomaly model's whole scoring path as one ONNX graph: image in, image score and map out.

Everything `AnomalyModel.score` computes after preprocessing is torch: the backbone's feature maps,
the detector's patch embedding and patch scores (PaDiM's Mahalanobis distances, PatchCore's
distance to the nearest memory-bank patch, reverse distillation's teacher-student cosine
distance), the upsampling and Gaussian blur of the map (two constant matrices,
components/anomaly_map.py) and the image score (top-mean, max, or PatchCore's re-weighted
maximum). So the graph is the model, and is checked against `AnomalyModel.score` on synthetic
images. Around it the caller still decodes and resizes images, compares the score with the saved
threshold and colours the map: `client_steps` says how, with the model's values.

PatchCore scores each patch against the whole bank at once here (the eager code goes block by
block): memory is patches x bank size x 4 bytes per image, e.g. 64 MB for 1,024 patches and a
16,384-patch bank.
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
from visiontune.anomaly.workflow import load
from visiontune.data.images import load_rgb
from visiontune.errors import UserError, first_line
from visiontune.inference.onnx import (
    INPUT,
    OnnxModel,
    checkpoint_key,
    export_model,
    is_current,
    write_key,
)
from visiontune.io import write_text_atomic
from visiontune.runformat import ANOMALY_WEIGHTS_FILE, META_FILE

OUTPUTS = ("scores", "maps")
TOLERANCE = 1e-3  # relative to the largest reference score (map value): float32 round-off is ~1e-6
CHECK_IMAGES = 2
REFERENCE = "AnomalyModel.score (torch eager fp32)"


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


def export_onnx(directory: str | Path) -> tuple[Path, dict, AnomalyModel]:
    """DIR/export/model.onnx (exported again when the model's files changed), its check, and the
    model it came from."""
    directory = Path(directory).expanduser()
    model = load(directory, device="cpu", workers=0)
    key = {name: checkpoint_key(directory / name) for name in (ANOMALY_WEIGHTS_FILE, META_FILE)}
    out = directory / "export" / "model.onnx"
    if not is_current(out, key):
        graph = ScoringGraph(model)
        with torch.inference_mode():  # fills anomaly_map's cache of smoothing matrices, which a trace
            graph(torch.zeros(1, 3, model.image_size, model.image_size))  # would record as float64 ops
        try:
            export_model(graph, out, model.image_size, outputs=OUTPUTS)
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
            raise UserError(f"the scoring graph of this {model.detector.method} model ({model.extractor.backbone}, "
                            f"{model.image_size} px) does not export to ONNX: {first_line(exc, 300)}") from None
        write_key(out, key)
    return out, check_onnx(model, out), model


def check_onnx(model: AnomalyModel, path: Path) -> dict:
    """Scores and maps of the ONNX graph against `model.score` on CHECK_IMAGES synthetic images;
    writes PATH.check.json; a difference beyond TOLERANCE is a UserError."""
    session = OnnxModel(path).session
    with tempfile.TemporaryDirectory() as folder:
        paths = _synthetic_images(Path(folder), model.image_size)
        reference = model.score(paths)
        transform = anomaly_transform(model.preprocessing)
        images = torch.stack([transform(load_rgb(p, model.max_pixels)) for p in paths]).numpy()
    scores, maps = session.run(list(OUTPUTS), {INPUT: images})
    check = {"max_abs_diff_scores": float(np.abs(scores - reference.scores).max()),
             "max_abs_diff_maps": float(np.abs(maps - reference.maps).max()),
             "score_scale": float(np.abs(reference.scores).max()), "images": len(paths),
             "inputs": "synthetic images", "reference": REFERENCE, "tolerance": TOLERANCE}
    write_text_atomic(path.with_name(path.name + ".check.json"), json.dumps(check, indent=2) + "\n")
    limit = TOLERANCE * max(1.0, check["score_scale"], float(np.abs(reference.maps).max()))
    if max(check["max_abs_diff_scores"], check["max_abs_diff_maps"]) > limit:
        raise UserError(f"{path} does not match the model: max |difference| {check['max_abs_diff_scores']:.3g} "
                        f"(scores), {check['max_abs_diff_maps']:.3g} (maps) > {limit:.3g}; do not deploy it")
    return check


def client_steps(model: AnomalyModel) -> list[str]:
    """What the caller of the ONNX graph must do around it, with this model's values."""
    p, size = model.preprocessing, model.image_size
    low, high = model.map_range_
    return [
        (f"before: decode to RGB, resize the whole image to {size}x{size} ({p.interpolation}, antialiased, no "
         f"crop), scale to [0, 1], normalise with mean {list(p.mean)} and std {list(p.std)}, channels first "
         f"-> input '{INPUT}' float32 [N, 3, {size}, {size}]"),
        (f"after: an image is anomalous when its score >= {model.threshold_:.6g} (the saved threshold, "
         f"{model.threshold_rule_['rule']}); heat maps scale 'maps' from {low:.6g} (cold) to {high:.6g} (hot), "
         f"as `anomaly predict --heatmaps` draws them"),
    ]


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
