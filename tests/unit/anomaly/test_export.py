"""`visiontune export` of anomaly models: the whole scoring path (backbone, detector, map
smoothing, image score) as one ONNX graph that gives AnomalyModel.score's scores and maps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visiontune import anomaly
from visiontune.anomaly.components.anomaly_map import MapScoring
from visiontune.anomaly.data import anomaly_transform
from visiontune.anomaly.reverse_distillation import _pool
from visiontune.cli.main import main
from visiontune.data.images import load_rgb
from visiontune.inference.onnx import OnnxModel

from .conftest import write_plain

pytest.importorskip("onnxruntime")
SMALL = {"backbone": "test_resnet", "pretrained": False, "image_size": 64, "workers": 0, "coreset_ratio": 0.1}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return write_plain(tmp_path_factory.mktemp("export") / "plain", n=6)


def run_cli(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["visiontune", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.mark.parametrize(("method", "image_score"), [("padim", "top-mean"), ("patchcore", "top-mean"),
                                                     ("patchcore", "detector"), ("reverse-distillation", "max")])
def test_the_onnx_graph_gives_the_models_scores_and_maps(plain, tmp_path, monkeypatch, capsys, method, image_score):
    out = tmp_path / "model"
    model = anomaly.fit(plain / "good", method=method, out=out, scoring=MapScoring(image_score=image_score), **SMALL)
    assert run_cli(monkeypatch, "export", out) == 0
    path = out / "export" / "model.onnx"
    check = json.loads((out / "export" / "model.onnx.check.json").read_text())
    assert check["images"] == 2 and check["max_abs_diff_scores"] < 1e-5 and check["max_abs_diff_maps"] < 1e-5
    printed = capsys.readouterr().out
    assert f"written: {path}" in printed and f"{method} patch scores" in printed
    assert f"score >= {model.threshold_:.6g}" in printed and "not in the graph" in printed

    images = sorted((plain / "scratch").glob("*.png"))[:3]  # real images, a batch of another size
    expected = model.score(images)
    transform = anomaly_transform(model.preprocessing)
    batch = torch.stack([transform(load_rgb(p, model.max_pixels)) for p in images]).numpy()
    scores, maps = OnnxModel(path).session.run(["scores", "maps"], {"images": batch})
    np.testing.assert_allclose(scores, expected.scores, atol=1e-5 * max(1, np.abs(expected.scores).max()))
    np.testing.assert_allclose(maps, expected.maps, atol=1e-5 * max(1, np.abs(expected.maps).max()))


def test_anomaly_models_export_as_onnx_only(plain, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    anomaly.fit(plain / "good", method="padim", out=out, **SMALL)
    assert run_cli(monkeypatch, "export", out, "--format", "triton") == 2
    err = capsys.readouterr().err.strip()
    assert "is an anomaly model: it exports as --format onnx only" in err and len(err.splitlines()) == 1


def test_an_anomaly_folder_without_weights_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.json").write_text(json.dumps({"kind": "anomaly", "method": "padim"}))
    assert run_cli(monkeypatch, "export", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete anomaly model directory" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(("size", "target"), [((24, 24), (6, 6)), ((12, 12), (6, 6)), ((6, 6), (6, 6)),
                                               ((7, 9), (3, 4))])
def test_the_students_pooling_is_adaptive_average_pooling_bit_for_bit(size, target):
    """Reverse distillation pools with avg_pool2d where sizes divide (exportable when the level's
    size is known only at run time); the numbers must stay those of adaptive_avg_pool2d."""
    level = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(0))
    for layout in (torch.contiguous_format, torch.channels_last):
        level = level.contiguous(memory_format=layout)
        assert torch.equal(_pool(level, size, target), torch.nn.functional.adaptive_avg_pool2d(level, target))
