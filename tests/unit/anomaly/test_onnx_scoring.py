"""Scoring through the exported ONNX graph (`load`'s default on a CPU): chunked to bound PatchCore's
distances, exported once, and a graph that cannot be exported or fails its check falls back to the
eager code under "auto" but is an error when asked for."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from visiontune import anomaly
from visiontune.anomaly import onnx_scoring, workflow
from visiontune.errors import UserError

from .conftest import FIT_OPTIONS

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def saved(mvtec: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model"
    anomaly.fit(mvtec, method="patchcore", out=out, **FIT_OPTIONS)
    return out


@pytest.fixture
def model_dir(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(saved, copy)
    return copy


def test_the_graph_is_run_in_chunks_that_bound_patchcores_distances(model_dir, mvtec, monkeypatch):
    paths = sorted((mvtec / "test").rglob("*.png"))[:6]
    whole = anomaly.load(model_dir, workers=0, device="cpu")
    assert whole.backend == "onnx" and whole._graph.images_per_run >= 6
    monkeypatch.setattr(onnx_scoring, "GRAPH_BYTES", 1)
    chunked = anomaly.load(model_dir, workers=0, device="cpu")
    assert chunked._graph.images_per_run == 1
    expected, got = whole.score(paths), chunked.score(paths)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.maps, expected.maps, rtol=0, atol=1e-6)


def test_a_graph_that_cannot_be_exported_falls_back_to_torch_only_under_auto(model_dir, monkeypatch, caplog):
    def broken(*_, **__):
        raise PermissionError(f"[Errno 13] Permission denied: '{model_dir / 'export'}'")

    monkeypatch.setattr(workflow, "exported_graph", broken)
    with caplog.at_level(logging.WARNING):
        model = anomaly.load(model_dir, workers=0, device="cpu")
    assert model.backend == "torch" and model._graph is None
    assert "scoring in eager torch" in caplog.text and "Permission denied" in caplog.text
    with pytest.raises(PermissionError):
        anomaly.load(model_dir, workers=0, device="cpu", backend="onnx")


def test_a_graph_that_fails_its_check_is_not_used_and_is_checked_again(model_dir, monkeypatch, caplog):
    monkeypatch.setattr(onnx_scoring, "TOLERANCE", 0.0)  # float32 round-off alone now fails the check
    with pytest.raises(UserError, match="does not match the model"):
        anomaly.load(model_dir, workers=0, device="cpu", backend="onnx")
    assert not (model_dir / "export" / "model.onnx.json").exists()  # no key: exported and checked again next time
    assert json.loads((model_dir / "export" / "model.onnx.check.json").read_text())["passed"] is False
    with caplog.at_level(logging.WARNING):
        assert anomaly.load(model_dir, workers=0, device="cpu").backend == "torch"
    assert "does not match the model" in caplog.text
    monkeypatch.undo()
    assert anomaly.load(model_dir, workers=0, device="cpu").backend == "onnx"
    assert (model_dir / "export" / "model.onnx.json").is_file()


def test_backend_choices_are_checked_before_any_file_is_read(tmp_path):
    with pytest.raises(UserError, match="--backend must be one of auto, torch, onnx, not 'tensorrt'"):
        anomaly.load(tmp_path / "missing", backend="tensorrt")
