"""`evaluate`, `predict` and `report` on tiny trained runs: numbers checked against scikit-learn."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

import visiontune
from tests.conftest import TINY_OPTIONS, colour_image, write_class_folders
from visiontune.errors import UserError

TRAINED = {**TINY_OPTIONS, "epochs": 4, "lr": 1e-2}


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary")
    # Overlapping colours so that the model makes mistakes and every metric is non-trivial.
    data = write_class_folders(root / "data", {"blue": 20, "red": 20})
    for i in range(6):
        colour_image((120, 40, 130), seed=500 + i).save(data / "blue" / f"purple_{i}.png")
        colour_image((130, 40, 120), seed=600 + i).save(data / "red" / f"purple_{i}.png")
    return visiontune.fit(data, out=str(root / "run"), **TRAINED)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    data = write_class_folders(root / "data", {"blue": 14, "green": 14, "red": 14})
    return visiontune.fit(data, out=str(root / "run"), **{**TRAINED, "epochs": 2})


def read_predictions(run, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with (run.dir / "eval" / name / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    index = {label: i for i, label in enumerate(run.labels)}
    y_true = np.array([index[r["actual"]] for r in rows])
    probs = np.array([[float(r[f"p_{label}"]) for label in run.labels] for r in rows])
    return y_true, probs.argmax(axis=1), probs


@pytest.mark.parametrize("fixture", ["binary_run", "three_class_run"])
def test_metrics_equal_scikit_learn_on_saved_predictions(fixture, request):
    run = request.getfixturevalue(fixture)
    result = run.evaluate("test", workers=0)
    saved = json.loads((run.dir / "eval" / "test" / "metrics.json").read_text())
    y_true, y_pred, probs = read_predictions(run, "test")
    labels = np.arange(len(run.labels))
    assert saved["n"] == len(y_true) == result["n"]
    assert saved["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted", "micro"):
        expected = f1_score(y_true, y_pred, labels=labels, average=average, zero_division=0)
        assert saved[f"f1_{average}"] == pytest.approx(expected)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for k, label in enumerate(run.labels):
        assert saved["per_class"][label] == pytest.approx(
            {"precision": precision[k], "recall": recall[k], "f1": f1[k], "support": support[k]}
        )
    assert saved["confusion_matrix"]["counts"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert sum(p["count"] for p in saved["most_confused"]) == int((y_true != y_pred).sum())
    low, high = saved["bootstrap_95ci"]["accuracy"]
    assert low <= saved["accuracy"] <= high
    if len(run.labels) == 2:
        assert saved["binary"]["roc_auc"] == pytest.approx(roc_auc_score(y_true == 1, probs[:, 1]))
        assert (run.dir / "eval" / "test" / "roc_pr.png").stat().st_size > 0
    for figure in saved["figures"].values():
        assert (run.dir / "eval" / "test" / figure).is_file()


def test_target_recall_threshold_is_chosen_on_val_and_used_by_predict(binary_run):
    run = binary_run
    result = run.evaluate("val", target_recall=0.9, workers=0)
    saved = run.threshold
    assert saved["fitted_on"] == "val" and saved["positive"] == "red"
    y_true, _, probs = read_predictions(run, "val")
    chosen = probs[:, 1] >= saved["threshold"]
    assert chosen[y_true == 1].mean() >= 0.9  # recall on val at the saved threshold
    assert result["binary"]["threshold"]["here"]["recall"] >= 0.9
    assert "Optimistic" in result["notes"][0]  # val chose the threshold: said so

    images = [p for p in (Path(run.config.data) / "blue").iterdir()]
    predicted = run.predict(images, workers=0).rows
    for row in predicted:
        p_red = row["top1_probability"] if row["top1_label"] == "red" else 1 - row["top1_probability"]
        assert row["label"] == ("red" if p_red >= saved["threshold"] else "blue")


def test_temperature_is_fitted_on_val_and_lowers_nll(binary_run):
    result = binary_run.evaluate("test", temperature=True, workers=0)
    calibration = json.loads((binary_run.dir / "calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and calibration["temperature"] > 0
    assert result["calibration"]["temperature"] == calibration["temperature"]
    assert "temperature_scaled" in result["calibration"]
    (binary_run.dir / "calibration.json").unlink()  # keep the other tests' probabilities raw


def test_out_of_domain_folder_matches_classes_by_name(binary_run, tmp_path):
    other = write_class_folders(tmp_path / "web", {"red": 5, "blue": 5, "green": 3}, seed=7)
    result = binary_run.evaluate(data=str(other), workers=0)
    assert result["name"] == "ood-web" and result["n"] == 10
    assert "used for no choice" in result["notes"][0]
    assert result["unknown_classes"] == ["green"]
    assert result["in_domain"]["split"] == "test"
    assert "ood-web" in (binary_run.dir / "report.html").read_text()


def test_evaluate_without_test_split_says_what_to_do(tmp_path, split_folders):
    (split_folders / "test").rename(tmp_path / "moved")
    run = visiontune.fit(split_folders, out=str(tmp_path / "run"), **TINY_OPTIONS)
    with pytest.raises(UserError, match="--split val"):
        run.evaluate("test")


def _predict_peak_rss_kib(run, folder: Path, out: Path) -> tuple[int, int, int]:
    code = (
        "import resource, visiontune\n"
        f"r = visiontune.load_run({str(run.dir)!r}).predict({str(folder)!r}, out={str(out)!r}, workers=0)\n"
        "print(r.written, len(r.skipped), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    written, skipped, peak = map(int, done.stdout.split())
    return written, skipped, peak


def test_predict_streams_2000_images_with_flat_memory(binary_run, tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    for folder, n in ((small, 200), (large, 2000)):
        folder.mkdir()
        for i in range(n):
            Image.fromarray(np.full((24, 24, 3), i % 250, np.uint8)).save(folder / f"{i:05d}.png")
    (large / "broken.png").write_bytes(b"not a png")
    n_small, _, rss_small = _predict_peak_rss_kib(binary_run, small, tmp_path / "small.csv")
    n_large, n_skipped, rss_large = _predict_peak_rss_kib(binary_run, large, tmp_path / "large.csv")
    assert (n_small, n_large, n_skipped) == (200, 2000, 1)
    assert len((tmp_path / "large.csv").read_text().splitlines()) == 2001
    assert "broken.png" in (tmp_path / "large.skipped.csv").read_text()
    assert rss_large - rss_small < 30 * 1024, f"peak RSS grew by {(rss_large - rss_small) / 1024:.0f} MiB"


def test_predict_api_records_and_formats(binary_run, tmp_path):
    images = sorted((Path(binary_run.config.data) / "red").iterdir())[:3]
    result = binary_run.predict(images, top_k=2, workers=0)
    assert [Path(r["path"]).name for r in result.rows] == [p.name for p in images]
    assert set(result.rows[0]) == {"path", "label", "probability", "top1_label", "top1_probability",
                                   "top2_label", "top2_probability", "ood_score", "ood"}
    out = binary_run.predict(images, out=tmp_path / "p.jsonl", workers=0)
    assert out.written == 3 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 3
    with pytest.raises(UserError, match=".csv or .jsonl"):
        binary_run.predict(images, out=tmp_path / "p.txt")
    with pytest.raises(UserError, match="no such file"):
        binary_run.predict([tmp_path / "missing.png"])


def test_a_fitted_temperature_changes_the_probabilities_shown_not_the_threshold_decisions(binary_run):
    """The saved threshold was chosen on the uncalibrated probabilities, so predict decides on those."""
    run = binary_run
    run.evaluate("val", target_recall=0.9, workers=0)
    images = sorted(str(p) for p in (Path(run.config.data) / "blue").iterdir()) + \
        sorted(str(p) for p in (Path(run.config.data) / "red").iterdir())
    before = run.predict(images, workers=0).rows
    (run.dir / "calibration.json").write_text(json.dumps({"temperature": 25.0, "fitted_on": "val"}))
    try:
        after = run.predict(images, workers=0).rows
    finally:
        (run.dir / "calibration.json").unlink()
    assert [row["label"] for row in after] == [row["label"] for row in before]
    assert max(abs(a["top1_probability"] - 0.5) for a in after) < max(abs(b["top1_probability"] - 0.5) for b in before)
