"""Both methods on synthetic scratches with a small random-init backbone: accuracy, exact reload,
the threshold rule, and saving without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from visiontune import anomaly
from visiontune.anomaly.calibration import cached_embeddings, out_of_fold_scores
from visiontune.anomaly.data import good_images
from visiontune.anomaly.workflow import split_holdout

from .conftest import FIT_OPTIONS


@pytest.fixture(scope="module", params=["patchcore", "padim"])
def fitted(request, mvtec: Path, tmp_path_factory) -> tuple[str, Path, anomaly.AnomalyModel]:
    out = tmp_path_factory.mktemp(request.param) / "model"
    model = anomaly.fit(mvtec, method=request.param, out=out, **FIT_OPTIONS)
    return request.param, out, model


def test_scratches_are_found_at_image_and_pixel_level(fitted, mvtec: Path, tmp_path: Path) -> None:
    method, _, model = fitted
    metrics = anomaly.evaluate(model, mvtec, out=tmp_path / "eval")
    assert metrics["image_auroc"] >= 0.95, method
    assert metrics["pixel_auroc"] >= 0.90, method
    assert metrics["aupro"] > 0.5
    assert set(metrics["per_defect_type"]) == {"scratch"}
    assert metrics["good_images"] == metrics["defect_images"] == 16
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "data:image/png;base64," in report and "<img src=\"http" not in report  # self-contained


def test_reload_gives_identical_scores_and_maps(fitted, mvtec: Path) -> None:
    method, out, model = fitted
    paths = sorted((mvtec / "test").rglob("*.png"))[:12]
    before = model.score(paths)
    reloaded = anomaly.load(out, workers=0)
    after = reloaded.score(paths)
    assert np.array_equal(before.scores, after.scores), method
    assert np.array_equal(before.maps, after.maps)
    assert reloaded.threshold_ == model.threshold_ and reloaded.map_range_ == model.map_range_
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]


def test_small_sets_calibrate_on_out_of_fold_scores_of_every_image(fitted, mvtec: Path) -> None:
    method, out, model = fitted
    files = good_images(mvtec)
    info = model.fit_info_
    assert (info["train_images"], info["holdout_images"]) == (40, 0)  # below 100 images: all fit, all calibrate
    assert info["calibration"] == {"method": "5-fold out-of-bank scores of the training images", "folds": 5, "scores": 40}
    embeddings = cached_embeddings(model, files, [], {"load_s": 0.0, "features_s": 0.0, "images": 0})
    scores, _ = out_of_fold_scores(model, embeddings, 5, seed=0)
    assert model.threshold_ == pytest.approx(np.quantile(scores, 0.99), rel=1e-6)
    in_bank = model.score(files).scores  # what the final detector says of its own training images
    assert model.threshold_ > np.quantile(in_bank, 0.99), method
    saved = json.loads((out / "model.json").read_text())
    assert saved["threshold_rule"] == {"rule": "good-quantile", "calibration_scores": 40, "false_alarm_rate": 0.01}
    assert saved["threshold"] == model.threshold_


def test_holdout_calibration_is_the_upper_quantile_of_held_out_good_scores(mvtec: Path, caplog) -> None:
    model = anomaly.fit(mvtec, method="padim", calibration="holdout", **FIT_OPTIONS | {"image_size": 64})
    train, holdout = split_holdout(good_images(mvtec), 0.1, seed=0)
    assert model.fit_info_["holdout_images"] == len(holdout) == 4
    assert model.fit_info_["train_images"] == len(train) == 36
    assert model.threshold_ == pytest.approx(np.quantile(model.score(holdout).scores, 0.99), rel=1e-6)
    assert model.threshold_rule_["calibration_scores"] == 4
    assert "rests on 4 good image scores, too few for a 1% false-alarm rate (that needs at least 100)" in caplog.text


def test_labelled_defects_make_the_threshold_f1_optimal(mvtec: Path) -> None:
    options = FIT_OPTIONS | {"image_size": 64}
    model = anomaly.fit(mvtec, method="padim", defects=mvtec / "test" / "scratch", **options)
    assert model.threshold_rule_ == {"rule": "f1-optimal", "calibration_scores": 40}
    assert model.fit_info_["defect_images"] == 16
    good = model.score(good_images(mvtec)).scores
    bad = model.score(sorted((mvtec / "test" / "scratch").glob("*.png"))).scores
    assert (good < model.threshold_).all() and (bad >= model.threshold_).all()  # separable here: F1 = 1


def test_predict_writes_scores_decisions_and_heatmaps(fitted, mvtec: Path, tmp_path: Path) -> None:
    _, out, _ = fitted
    rows = anomaly.predict(out, [mvtec / "test" / "scratch", mvtec / "test" / "good" / "000.png"],
                           out=tmp_path / "scores.csv", heatmaps=tmp_path / "heat", workers=0)
    assert len(rows) == 17 and rows[-1]["path"].endswith("good/000.png")
    assert sum(r["decision"] == "anomalous" for r in rows[:16]) >= 14
    assert all(Path(r["heatmap"]).is_file() for r in rows)
    header = (tmp_path / "scores.csv").read_text().splitlines()[0]
    assert header == "path,score,decision,threshold,heatmap,reason"
