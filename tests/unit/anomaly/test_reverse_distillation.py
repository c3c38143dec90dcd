"""Reverse distillation on synthetic scratches with a small random-init backbone and a short
training: accuracy, same seed same scores, exact reload, fitting under inference mode, the memory
bound, clear errors, and the CLI's --method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from visiontune import anomaly
from visiontune.anomaly import reverse_distillation
from visiontune.anomaly.base import AnomalyModel
from visiontune.anomaly.calibration import cached_embeddings
from visiontune.anomaly.components.features import resolve_layers
from visiontune.anomaly.data import good_images
from visiontune.anomaly.reverse_distillation import ReverseDistillation
from visiontune.anomaly.workflow import split_holdout
from visiontune.cli.anomaly import anomaly_app
from visiontune.data.transforms import Preprocessing
from visiontune.devices import plan_cpu
from visiontune.errors import UserError
from visiontune.models.extractor import create_extractor

from .conftest import SIZE, write_plain

BACKBONE = "resnet18"
EPOCHS = 5  # 25 optimizer steps, to keep the test short


@pytest.fixture(scope="module")
def fitted(mvtec: Path) -> AnomalyModel:
    """Fitted as `anomaly.fit` would, but with a short training and a held-out threshold (one fit)."""
    plan_cpu(workers=0).apply()  # threads for the free cores, as `anomaly.fit` plans them
    layers = resolve_layers(BACKBONE, None, ReverseDistillation.default_strides)
    extractor = create_extractor(BACKBONE, layers, pretrained=False, weights=None, seed=0)
    model = AnomalyModel(extractor, ReverseDistillation(epochs=EPOCHS), Preprocessing.from_model(extractor.model, SIZE),
                         workers=0, device="cpu")
    train, holdout = split_holdout(good_images(mvtec), 0.1, seed=0)
    return model.fit(train, holdout)


@pytest.fixture(scope="module")
def embeddings(fitted: AnomalyModel, mvtec: Path):
    return cached_embeddings(fitted, good_images(mvtec)[:16], [], {"load_s": 0.0, "features_s": 0.0, "images": 0})


def test_scratches_are_found(fitted: AnomalyModel, mvtec: Path) -> None:
    """Above chance after a short training on 36 images (image AUROC 0.66, pixel 0.74 with the
    default sigma-8 maps); with more steps it finds them (image AUROC 0.98, pixel 0.96: 180 images of
    a larger set of these, 16 epochs, sigma 4)."""
    metrics = anomaly.evaluate(fitted, mvtec)
    assert metrics["image_auroc"] >= 0.6
    assert metrics["pixel_auroc"] >= 0.7
    assert fitted.detector.levels == [(64, 24, 24), (128, 12, 12), (256, 6, 6)]


def test_same_seed_same_scores_another_seed_others(fitted: AnomalyModel, embeddings) -> None:
    batch = next(embeddings.batches(range(8)))
    scores = []
    for seed in (0, 0, 1):
        detector = ReverseDistillation(**fitted.detector.params() | {"epochs": 2, "seed": seed})
        with torch.inference_mode():  # as `score_batches` runs: fit trains all the same
            scores.append(detector.fit(embeddings.batches(range(len(embeddings)))).score(batch)[0])
    assert torch.equal(scores[0], scores[1])
    assert not torch.equal(scores[0], scores[2])


def test_reload_gives_identical_scores(fitted: AnomalyModel, mvtec: Path, tmp_path: Path) -> None:
    paths = sorted((mvtec / "test").rglob("*.png"))[:12]
    fitted.save(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "model.json").read_text())
    assert saved["method"] == "reverse-distillation"
    assert saved["detector"]["levels"] == [[64, 24, 24], [128, 12, 12], [256, 6, 6]]
    reloaded = anomaly.load(tmp_path / "model", workers=0, device="cpu", backend="torch")
    before, after = fitted.score(paths), reloaded.score(paths)
    assert np.array_equal(before.scores, after.scores) and np.array_equal(before.maps, after.maps)


def test_training_features_past_the_budget_are_refused(embeddings, monkeypatch) -> None:
    monkeypatch.setattr(reverse_distillation, "EMBEDDING_BUDGET", 10**6)
    detector = ReverseDistillation(levels=[(64, 24, 24), (128, 12, 12), (256, 6, 6)])
    with pytest.raises(UserError, match="in memory, and those of 16 images already exceed"):
        detector.fit(embeddings.batches(range(len(embeddings))))


@pytest.mark.parametrize(("params", "message"), [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"learning_rate": 0}, "learning_rate must be positive"),
    ({"levels": [[24, 24]]}, "levels must be"),
])
def test_invalid_params_are_refused(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReverseDistillation(**params)


def test_maps_of_other_levels_are_refused() -> None:
    detector = ReverseDistillation(levels=[(8, 4, 4)])
    with pytest.raises(ValueError, match=r"backbone maps \[\(8, 8, 8\)\] do not match"):
        detector.embed([torch.zeros(1, 8, 8, 8)])


def test_cli_fits_it_by_name(tmp_path: Path) -> None:
    root = write_plain(tmp_path / "plain", n=6)
    result = CliRunner().invoke(anomaly_app, ["fit", str(root / "good"), "--out", str(tmp_path / "m"), "--backbone",
                                              "test_resnet", "--no-pretrained", "--image-size", "32",
                                              "--method", "reverse-distillation", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "fitted reverse-distillation on 6 images" in result.output
    result = CliRunner().invoke(anomaly_app, ["fit", str(root / "good"), "--out", str(tmp_path / "n"),
                                              "--method", "rd"])
    assert result.exit_code == 2
    assert "unknown method 'rd'; use one of patchcore, padim, reverse-distillation" in result.output
