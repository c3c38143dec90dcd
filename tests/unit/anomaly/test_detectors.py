"""Both methods on synthetic scratches with a small random-init backbone: accuracy, exact reload,
the threshold rules, intervals and the report, and saving without pickle."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from visiontune import anomaly
from visiontune.anomaly.calibration import cached_embeddings, out_of_fold_scores
from visiontune.anomaly.components.anomaly_map import LEGACY_SCORING, smooth_anomaly_map
from visiontune.anomaly.components.threshold import flagged_share
from visiontune.anomaly.data import good_images
from visiontune.anomaly.workflow import split_holdout
from visiontune.errors import UserError

from .conftest import FIT_OPTIONS, write_plain

TARGET = 0.75


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
    reloaded = anomaly.load(out, workers=0, backend="torch")
    after = reloaded.score(paths)
    assert np.array_equal(before.scores, after.scores), method
    assert np.array_equal(before.maps, after.maps)
    assert reloaded.threshold_ == model.threshold_ and reloaded.map_range_ == model.map_range_
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]


def test_reload_on_a_cpu_scores_through_the_checked_onnx_graph(fitted, mvtec: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    method, out, model = fitted
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    paths = sorted((mvtec / "test").rglob("*.png"))[:12]
    before = model.score(paths)
    reloaded = anomaly.load(copy, workers=0, device="cpu")
    assert (model.backend, reloaded.backend) == ("torch", "onnx"), method
    after = reloaded.score(paths)
    scale = max(1.0, float(np.abs(before.scores).max()), float(np.abs(before.maps).max()))
    np.testing.assert_allclose(after.scores, before.scores, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(after.maps, before.maps, rtol=0, atol=1e-5 * scale)
    assert not np.array_equal(after.maps, before.maps)  # it is another computation, not the eager one again
    check = json.loads((copy / "export" / "model.onnx.check.json").read_text())
    assert check["max_abs_diff_maps"] < 1e-5 * scale
    exported = (copy / "export" / "model.onnx").stat().st_mtime_ns
    assert anomaly.load(copy, workers=0, device="cpu").backend == "onnx"
    assert (copy / "export" / "model.onnx").stat().st_mtime_ns == exported  # exported once, then reused


def test_models_saved_before_scoring_was_recorded_keep_their_rule(fitted, mvtec: Path, tmp_path: Path) -> None:
    method, out, model = fitted
    assert json.loads((out / "model.json").read_text())["scoring"] == {"sigma": 8.0, "image_score": "top-mean",
                                                                        "top_share": 0.01}
    old = tmp_path / "old"
    shutil.copytree(out, old)
    info = json.loads((old / "model.json").read_text())
    del info["scoring"]
    (old / "model.json").write_text(json.dumps(info))
    paths = sorted((mvtec / "test").rglob("*.png"))[:6]
    legacy = anomaly.load(old, workers=0)
    assert legacy.scoring == LEGACY_SCORING
    by_old_rule = legacy.score(paths)
    (images, _), = legacy._batches(paths, [])
    patch_scores, own = legacy.detector.score(legacy._embed(images))
    expected = own if own is not None else smooth_anomaly_map(patch_scores, model.image_size, 4.0).flatten(1).amax(1)
    np.testing.assert_allclose(by_old_rule.scores, expected.numpy(), rtol=1e-5)
    assert not np.allclose(by_old_rule.scores, model.score(paths).scores)  # the new rule differs
    info["scoring"] = {"sigma": -1}
    (old / "model.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="damaged 'scoring' entry"):
        anomaly.load(old)


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
    model = anomaly.fit(mvtec, method="padim", val_defects=mvtec / "test" / "scratch", **options)
    assert model.threshold_rule_ == {"rule": "f1-optimal", "calibration_scores": 40}
    assert model.fit_info_["defect_images"] == 16
    good = model.score(good_images(mvtec)).scores
    bad = model.score(sorted((mvtec / "test" / "scratch").glob("*.png"))).scores
    assert (good < model.threshold_).all() and (bad >= model.threshold_).all()  # separable here: F1 = 1


@pytest.fixture(scope="module")
def target_recall_fit(mvtec: Path, tmp_path_factory) -> tuple[Path, Path, anomaly.AnomalyModel]:
    """PaDiM with its threshold at a target recall on 8 validation scratches apart from the test set
    (defect-type layout with masks beside them, which are not validation images)."""
    val = write_plain(tmp_path_factory.mktemp("val") / "defects", seed=7, n=8)
    shutil.rmtree(val / "good")
    out = tmp_path_factory.mktemp("target") / "model"
    model = anomaly.fit(mvtec, method="padim", val_defects=val, target_recall=TARGET, out=out,
                        **FIT_OPTIONS | {"image_size": 64})
    return val, out, model


def test_target_recall_threshold_is_the_highest_that_reaches_it_on_validation(target_recall_fit, mvtec: Path) -> None:
    val, out, model = target_recall_fit
    rule = json.loads((out / "model.json").read_text())["threshold_rule"]
    threshold = model.threshold_
    val_scores = model.score(sorted((val / "scratch").glob("*.png"))).scores
    embeddings = cached_embeddings(model, good_images(mvtec), [], {"load_s": 0.0, "features_s": 0.0, "images": 0})
    good_scores, _ = out_of_fold_scores(model, embeddings, 5, seed=0)
    assert rule == {"rule": "target-recall", "calibration_scores": 40, "target_recall": TARGET,
                    "validation_defect_images": 8, "validation_recall": flagged_share(val_scores, threshold),
                    "validation_false_alarm_rate": flagged_share(good_scores, threshold)}
    assert rule["validation_recall"] >= TARGET
    next_higher = val_scores[val_scores > threshold].min()
    assert flagged_share(val_scores, next_higher) < TARGET


def test_rates_at_the_threshold_come_with_intervals_and_the_report_shows_it(target_recall_fit, mvtec: Path,
                                                                          tmp_path: Path) -> None:
    _, _, model = target_recall_fit
    metrics = anomaly.evaluate(model, mvtec, out=tmp_path / "eval")
    rows = [metrics, *metrics["per_defect_type"].values()]
    for row in rows:
        for rate in ("recall_at_threshold", "false_alarm_rate_at_threshold"):
            low, high = row[f"{rate}_ci95"]
            assert 0 <= low <= row[rate] <= high <= 1 and low < high, rate
    assert metrics["ci95_method"] == "Wilson score interval"
    assert metrics["per_defect_type"]["scratch"]["recall_at_threshold"] == metrics["recall_at_threshold"]
    report = (tmp_path / "eval" / "report.html").read_text()
    histogram = re.search(r'<section id="score-histogram">.*?src="(data:image/png;base64,[^"]+)"', report, re.DOTALL)
    assert histogram and (tmp_path / "eval" / "score_histogram.png").is_file()
    assert "rule target-recall" in report and "95% CI" in report


def test_predict_writes_scores_decisions_and_heatmaps(fitted, mvtec: Path, tmp_path: Path) -> None:
    _, out, _ = fitted
    rows = anomaly.predict(out, [mvtec / "test" / "scratch", mvtec / "test" / "good" / "000.png"],
                           out=tmp_path / "scores.csv", heatmaps=tmp_path / "heat", workers=0)
    assert len(rows) == 17 and rows[-1]["path"].endswith("good/000.png")
    assert sum(r["decision"] == "anomalous" for r in rows[:16]) >= 14
    assert all(Path(r["heatmap"]).is_file() for r in rows)
    header = (tmp_path / "scores.csv").read_text().splitlines()[0]
    assert header == "path,score,decision,threshold,heatmap,reason"


def test_fit_takes_a_scoring_rule_and_saves_it(mvtec: Path, tmp_path: Path) -> None:
    from visiontune.anomaly.components.anomaly_map import MapScoring

    model = anomaly.fit(mvtec, method="padim", out=tmp_path / "m", scoring=MapScoring(sigma=4.0, image_score="max"),
                        **FIT_OPTIONS)
    saved = json.loads((tmp_path / "m" / "model.json").read_text())["scoring"]
    assert saved == {"sigma": 4.0, "image_score": "max", "top_share": 0.01}
    scored = model.score(sorted((mvtec / "test").rglob("*.png"))[:4])
    np.testing.assert_array_equal(scored.scores, scored.maps.reshape(4, -1).max(axis=1))
