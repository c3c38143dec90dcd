"""Every artifact kind says what it is; each entry point refuses the other kinds with one line
naming the right one, and a newer format asks for an upgrade."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import visiontune
from visiontune import anomaly
from visiontune.cli.main import main
from visiontune.errors import UserError
from visiontune.runformat import (
    FORMAT_VERSION,
    LEGACY_ANOMALY_FORMAT,
    WrongArtifactError,
    meta_fields,
    read_meta,
)

CLASSIFIER = {"model": "resnet10t", "labels": ["a", "b"], "preprocessing": {}, "loss": "ce"}
ANOMALY = {"method": "patchcore", "backbone": "resnet18", "layers": ["layer2"]}


def run_cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["visiontune", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def artifact(folder: Path, fields: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.json").write_text(json.dumps(fields))
    return folder


@pytest.fixture
def anomaly_dir(tmp_path: Path) -> Path:
    return artifact(tmp_path / "anomaly", {**meta_fields("anomaly", "0.1.0"), **ANOMALY})


@pytest.fixture
def classifier_dir(tmp_path: Path) -> Path:
    return artifact(tmp_path / "run", {**meta_fields("classifier", "0.1.0"), **CLASSIFIER})


def test_each_kind_reads_back_through_its_own_entry_point(anomaly_dir, classifier_dir):
    assert read_meta(classifier_dir, "classifier")["labels"] == ["a", "b"]
    assert read_meta(anomaly_dir, "anomaly")["method"] == "patchcore"
    assert visiontune.load_run(classifier_dir).labels == ["a", "b"]


def test_load_run_on_an_anomaly_model_names_the_anomaly_api(anomaly_dir):
    with pytest.raises(WrongArtifactError, match=r"is an anomaly model, not a classifier run; open it with "
                                                  r"visiontune\.anomaly\.load\(DIR\)"):
        visiontune.load_run(anomaly_dir)


def test_anomaly_load_on_a_classifier_run_names_load_run(classifier_dir):
    with pytest.raises(WrongArtifactError, match=r"is a classifier model, not an anomaly model; open it with "
                                                  r"visiontune\.load_run\(DIR\)"):
        anomaly.load(classifier_dir)


@pytest.mark.parametrize("command", [["evaluate", "{a}"], ["predict", "{a}", "{a}"], ["explain", "{a}", "{a}"],
                                     ["benchmark", "{a}"]])
def test_classifier_commands_on_an_anomaly_model_exit_2_with_one_line(anomaly_dir, command, monkeypatch, capsys):
    assert run_cli(monkeypatch, *[part.format(a=anomaly_dir) for part in command]) == 2
    error = capsys.readouterr().err
    assert "is an anomaly model" in error and "visiontune anomaly predict" in error and "Traceback" not in error


@pytest.mark.parametrize("command", [["anomaly", "predict", "{r}", "{d}", "--out", "{r}/s.csv"],
                                     ["anomaly", "evaluate", "{r}", "--data", "{d}"]])
def test_anomaly_commands_on_a_classifier_run_exit_2_with_one_line(classifier_dir, command, monkeypatch, capsys):
    data = classifier_dir.parent / "data"
    for folder in ("good", "scratch"):
        (data / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / folder / "0.png")
    assert run_cli(monkeypatch, *[part.format(r=classifier_dir, d=data) for part in command]) == 2
    error = capsys.readouterr().err
    assert "is a classifier model" in error and "visiontune evaluate" in error and "Traceback" not in error


def test_files_from_before_kind_existed_are_recognised(tmp_path):
    old_run = artifact(tmp_path / "old-run", {"format": 1, **CLASSIFIER})
    old_anomaly = artifact(tmp_path / "old-anomaly", {"format": LEGACY_ANOMALY_FORMAT, **ANOMALY})
    assert read_meta(old_run, "classifier")["model"] == "resnet10t"
    assert read_meta(old_anomaly, "anomaly")["backbone"] == "resnet18"
    with pytest.raises(WrongArtifactError, match="is an anomaly model"):
        read_meta(old_anomaly, "classifier")


def test_a_newer_format_asks_for_an_upgrade(tmp_path):
    newer = artifact(tmp_path / "newer", {**meta_fields("classifier", "9.0"), **CLASSIFIER,
                                          "format_version": FORMAT_VERSION + 1})
    with pytest.raises(UserError, match=r"written by a newer visiontune \(9\.0, format 2; this one reads up to 1\): "
                                        r"upgrade visiontune"):
        read_meta(newer, "classifier")


@pytest.mark.parametrize("fields, message", [
    ({"model": "x"}, "is damaged: kind: Field required"),
    ({"kind": "segmenter"}, "is damaged: kind: Input should be 'classifier', 'anomaly', 'caption' or 'detector'"),
])
def test_unknown_or_missing_kind_is_a_damaged_file(tmp_path, fields, message):
    with pytest.raises(UserError, match=message):
        read_meta(artifact(tmp_path / "x", fields), "classifier")


def test_a_folder_without_model_json_says_what_it_is_not(tmp_path):
    with pytest.raises(UserError, match="is not a visiontune run directory"):
        visiontune.load_run(tmp_path)
    with pytest.raises(UserError, match="is not an anomaly model directory"):
        anomaly.load(tmp_path)
