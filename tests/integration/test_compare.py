"""`compare` and `lr-find`: three backbones, one split, one table with every column filled."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
from typer.testing import CliRunner

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.cli.main import app
from visiontune.comparison import COLUMNS
from visiontune.data.sources import discover
from visiontune.errors import UserError

MODELS = ["test_resnet", "test_efficientnet", "test_vit"]  # three families, each a few 100k params
OPTIONS = {**TINY_OPTIONS, "epochs": 1}
TINY_FLAGS = ["--no-pretrained", "--image-size", "32", "--epochs", "1", "--freeze-epochs", "1",
              "--workers", "0", "--batch-size", "8", "--augment", "none", "--no-report"]


@pytest.fixture
def three_classes(tmp_path):
    return write_class_folders(tmp_path / "data", {"blue": 10, "green": 10, "red": 10})


def test_compare_trains_each_model_on_one_split_and_tabulates_all_columns(three_classes, tmp_path):
    out = tmp_path / "cmp"
    result = visiontune.compare(three_classes, models=MODELS, out=out, timing_batch=4, timing_repeats=3, **OPTIONS)

    assert [row["model"] for row in result.rows] == MODELS
    with result.csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == MODELS and list(rows[0]) == list(COLUMNS)
    for row in rows:
        numbers = {k: float(v) for k, v in row.items() if k not in ("model", "run")}
        assert all(math.isfinite(v) for v in numbers.values()), row
        assert numbers["accuracy_ci_low"] <= numbers["accuracy"] <= numbers["accuracy_ci_high"]
        assert numbers["f1_macro_ci_low"] <= numbers["f1_macro"] <= numbers["f1_macro_ci_high"]
        assert numbers["params"] > 10_000 and numbers["train_s"] > 0 and numbers["ms_per_image"] > 0
        assert numbers["timing_batch"] == 4 and numbers["test_images"] == 3
    assert len({r["params"] for r in rows}) == 3  # really three different networks

    def test_paths(split_file):
        return sorted(s.path for s in discover(split_file).samples if s.split == "test")

    shared = test_paths(out / "splits.csv")
    assert len(shared) == 3
    for row in result.rows:
        assert test_paths(os.path.join(row["run"], "splits.csv")) == shared
        evaluated = json.loads((tmp_path / row["run"] / "eval/test/metrics.json").read_text())
        assert evaluated["accuracy"] == row["accuracy"]
    markdown = result.markdown.read_text()
    assert all(name in markdown for name in MODELS) and "95% CI" in markdown and "batch 4" in markdown
    assert result.plot.read_bytes()[:4] == b"\x89PNG"

    # the same OUT again: finished runs are reused, not retrained
    mtimes = {row["model"]: os.path.getmtime(os.path.join(row["run"], "summary.json")) for row in result.rows}
    again = visiontune.compare(three_classes, models=MODELS, out=out, timing_batch=4, timing_repeats=1,
                               **OPTIONS)
    assert [r["accuracy"] for r in again.rows] == [r["accuracy"] for r in result.rows]
    assert mtimes == {r["model"]: os.path.getmtime(os.path.join(r["run"], "summary.json")) for r in again.rows}
    with pytest.raises(UserError, match="trained with other options"):
        visiontune.compare(three_classes, models=MODELS[:1], out=out, **{**OPTIONS, "seed": 1})


def test_unknown_model_stops_before_any_training(three_classes, tmp_path):
    with pytest.raises(UserError, match="unknown model 'resnet_nope'"):
        visiontune.compare(three_classes, models="test_resnet,resnet_nope", out=tmp_path / "cmp", **OPTIONS)
    assert not (tmp_path / "cmp").exists()


def test_compare_needs_a_test_split(three_classes, tmp_path):
    with pytest.raises(UserError, match="held-out test split"):
        visiontune.compare(three_classes, models="test_resnet", out=tmp_path / "c", **{**OPTIONS, "test_fraction": 0})
    assert not (tmp_path / "c" / "splits.csv").exists()  # refused before it is written, so never reused


def test_cli_compare_takes_train_options(three_classes, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(three_classes), "--models", "test_resnet", "--out", str(out),
                                      "--timing-batch", "2", "--timing-repeats", "1", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    assert "test_resnet" in result.output and "ms / image" in result.output and "(batch 2)" in result.output
    assert [r["model"] for r in csv.DictReader((out / "comparison.csv").open())] == ["test_resnet"]
    config = (out / "runs/test_resnet/config.yaml").read_text()
    assert "epochs: 1\n" in config and "image_size: 32\n" in config


def test_cli_lr_find_and_train_option_errors(three_classes, tmp_path):
    out = tmp_path / "lr"
    result = CliRunner().invoke(app, ["lr-find", str(three_classes), "--model", "test_resnet", "--steps", "20",
                                      "--out", str(out), *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    suggestion = json.loads((out / "lr_find.json").read_text())["suggestion"]
    assert f"suggested lr: {suggestion:.3g}" in result.output
    bad = CliRunner().invoke(app, ["lr-find", str(three_classes), "--epochz", "1"])
    assert bad.exit_code == 2 and "No such option: --epochz" in bad.output
    bad_lr = CliRunner().invoke(app, ["train", str(three_classes), "--lr", "fast"])
    assert isinstance(bad_lr.exception, UserError) and "positive number or 'auto'" in str(bad_lr.exception)
