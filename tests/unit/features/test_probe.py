"""Probes: accuracy on separable colours, evaluate's outputs recomputable, train's split, val-only choices."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from typer.testing import CliRunner

from tests.conftest import TINY_MODEL, write_class_folders
from visiontune.cli.main import app, main
from visiontune.data.sources import discover
from visiontune.errors import UserError
from visiontune.features.probes import probe

TINY = {"model": TINY_MODEL, "pretrained": False, "image_size": 32, "workers": 0, "threads": 1}


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "colours", {"blue": 20, "green": 20, "red": 20})


def _predictions(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("classifier", ["logreg", "svm", "knn"])
def test_probe_separates_colours_and_writes_evaluate_outputs(colours, tmp_path, classifier):
    summary = probe(colours, classifier=classifier, out=tmp_path / "probe", **TINY)
    samples = discover(colours).samples
    assert summary["counts"] == {split: sum(s.split == split for s in samples) for split in ("train", "val", "test")}
    for split in ("val", "test"):
        assert summary[split]["accuracy"] > 0.9
        metrics = json.loads((tmp_path / "probe" / split / "metrics.json").read_text())
        rows = _predictions(tmp_path / "probe" / split / "predictions.csv")
        assert [r["path"] for r in rows] == [s.path for s in samples if s.split == split]  # train's split
        actual, predicted = [r["actual"] for r in rows], [r["predicted"] for r in rows]
        assert metrics["accuracy"] == pytest.approx(accuracy_score(actual, predicted))
        assert metrics["f1_macro"] == pytest.approx(f1_score(actual, predicted, average="macro"))
        labels = ["blue", "green", "red"]
        assert metrics["confusion_matrix"]["counts"] == confusion_matrix(actual, predicted, labels=labels).tolist()
        assert set(metrics["bootstrap_95ci"]) >= {"accuracy", "f1_macro"} and set(metrics["per_class"]) == set(labels)
        assert (tmp_path / "probe" / split / "confusion_matrix.png").stat().st_size > 0
    assert "Optimistic" in json.loads((tmp_path / "probe" / "val" / "metrics.json").read_text())["notes"][0]
    best = max(row["val_accuracy"] for row in summary["candidates"])
    chosen = next(row for row in summary["candidates"] if all(row[k] == v for k, v in summary["chosen"].items()))
    assert chosen["val_accuracy"] == best and summary["chosen_on"] == "val"


def test_test_labels_take_no_part_in_the_choice(tmp_path):
    """Same train and val, test labels scrambled: the same hyperparameter and validation numbers."""
    data = write_class_folders(tmp_path / "images", {"blue": 12, "red": 12, "green": 12})
    files = sorted(data.rglob("*.png"))
    rng = np.random.default_rng(0)
    splits = rng.choice(["train", "train", "val", "test"], len(files))
    results = []
    for name, scramble in (("plain", False), ("scrambled", True)):
        table = tmp_path / f"{name}.csv"
        with table.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split"])
            for path, split in zip(files, splits):
                label = path.parent.name
                if scramble and split == "test":
                    label = rng.choice(["blue", "red", "green"])
                writer.writerow([path.relative_to(tmp_path), label, split])
        results.append(probe(table, classifier="logreg", out=tmp_path / name, **TINY))
    assert results[0]["candidates"] == results[1]["candidates"] and results[0]["chosen"] == results[1]["chosen"]
    assert results[0]["val"] == results[1]["val"]
    assert results[0]["test"]["accuracy"] > results[1]["test"]["accuracy"]


def test_probe_errors_and_empty_default_folder_cleanup(colours, tmp_path):
    with pytest.raises(UserError, match="logreg, svm, knn"):
        probe(colours, classifier="forest", out=tmp_path / "a", **TINY)
    with pytest.raises(UserError, match="unknown layer"):
        probe(colours, layers=["nope"], out=tmp_path / "b", **TINY)
    assert not (tmp_path / "b").exists()  # a failed probe leaves no empty folder


@pytest.mark.parametrize("args, message", [
    (["features", "{data}", "--layers", "layer9", "--out", "{tmp}/f.npz"], "unknown layer(s) layer9"),
    (["features", "{data}", "--out", "{tmp}/f.parquet"], "--out must end in .npz or .safetensors"),
    (["probe", "{data}", "--classifier", "forest", "--out", "{tmp}/p"], "--classifier must be one of"),
])
def test_cli_user_errors_exit_2_with_one_line(colours, tmp_path, args, message, monkeypatch, capsys):
    flags = ["--model", TINY_MODEL, "--no-pretrained", "--image-size", "32", "--workers", "0"]
    monkeypatch.setattr(sys, "argv", ["visiontune", *[a.format(data=colours, tmp=tmp_path) for a in args], *flags])
    with pytest.raises(SystemExit) as exited:
        main()  # the console entry point, in process
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_cli_features_then_probe(colours, tmp_path):
    flags = ["--model", TINY_MODEL, "--no-pretrained", "--image-size", "32", "--workers", "0", "--threads", "1"]
    runner = CliRunner()
    result = runner.invoke(app, ["features", str(colours), *flags, "--layers", "layer3,layer4", "--pool", "max",
                                 "--out", str(tmp_path / "f.safetensors")])
    assert result.exit_code == 0, result.output
    assert "60 images (layer3, layer4): features 60x288" in result.output
    result = runner.invoke(app, ["probe", str(colours), *flags, "--layers", "layer3,layer4", "--pool", "max",
                                 "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "val: 6 images, accuracy 1.0000" in result.output
    result = runner.invoke(app, ["probe", str(tmp_path / "f.safetensors"), "--out", str(tmp_path / "from_file")])
    assert result.exit_code == 0, result.output
    direct, from_file = (json.loads((tmp_path / name / "probe.json").read_text()) for name in ("p", "from_file"))
    assert from_file["candidates"] == direct["candidates"] and from_file["test"] == direct["test"]
    assert from_file["features_file"] == str(tmp_path / "f.safetensors") and direct["features_file"] is None
