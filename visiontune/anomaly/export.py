"""`visiontune export` of an anomaly model: its scoring graph (onnx_scoring.py), checked, and what
the caller of the graph must do around it.

Around the graph the caller still decodes and resizes images, compares the score with the saved
threshold and colours the map: `client_steps` says how, with the model's values.
"""

from __future__ import annotations

from pathlib import Path

from visiontune.anomaly.base import AnomalyModel
from visiontune.anomaly.onnx_scoring import exported_graph
from visiontune.anomaly.workflow import load
from visiontune.inference.onnx import INPUT


def export_onnx(directory: str | Path) -> tuple[Path, dict, AnomalyModel]:
    """DIR/export/model.onnx (exported again when the model's files changed), its check, made
    again now, and the model it came from."""
    model = load(directory, device="cpu", workers=0, backend="torch")
    path, check = exported_graph(model, directory, recheck=True)
    return path, check, model


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
