"""The lr range test: a suggestion inside the swept range, the recorded curve, the plot, `--lr auto`."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from rich.console import Console

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.config import config_for
from visiontune.errors import UserError
from visiontune.training.lr_find import _suggest, range_test
from visiontune.training.setup import build_setup


@pytest.fixture
def three_classes(tmp_path):
    return write_class_folders(tmp_path / "data", {"blue": 10, "green": 10, "red": 10})


def test_range_test_records_curve_and_suggests_lr_inside_range(three_classes, tmp_path):
    out = tmp_path / "lr"
    result = visiontune.lr_find(three_classes, start_lr=1e-5, end_lr=10.0, steps=30, out=out, **TINY_OPTIONS)
    assert 3 <= len(result.lrs) <= 30
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses)
    assert result.lrs[0] == pytest.approx(1e-5)
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))  # exponential sweep
    assert all(math.isfinite(v) for v in result.losses)
    assert 1e-5 <= result.suggestion <= 10.0 and result.suggestion in result.lrs
    assert result.min_loss_lr == pytest.approx(result.lrs[result.losses.index(min(result.losses))] / 10)
    assert result.stage == "frozen"  # TINY_OPTIONS has freeze_epochs=1: the head lr of the frozen stage
    assert any("cached backbone features" in note for note in result.notes)  # as the frozen stage trains
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["suggestion"] == result.suggestion and saved["lrs"] == result.lrs
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("options", "stage"), [({"feature_cache": False}, "frozen"), ({"freeze_epochs": 0}, "unfrozen")])
def test_range_test_through_the_backbone(three_classes, options, stage):
    """Without cached features (or without a frozen stage) every step runs the whole network."""
    result = visiontune.lr_find(three_classes, start_lr=1e-4, steps=20, **{**TINY_OPTIONS, **options})
    assert result.stage == stage and 1e-4 <= result.suggestion <= 10.0
    assert not any("cached" in note for note in result.notes)
    assert len(result.lrs) >= 10 and all(math.isfinite(v) for v in result.raw_losses)


def test_range_test_runs_on_a_training_setup_alone(three_classes, tmp_path, monkeypatch):
    """The sweep needs only what setup.py builds: no run directory, no trainer, nothing written."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    options = {key: value for key, value in TINY_OPTIONS.items() if key != "progress"}
    setup = build_setup(config_for(three_classes, None, options), Console(quiet=True))
    result = range_test(setup, start_lr=1e-5, end_lr=10.0, steps=20, progress=False, stage=None)
    assert result.stage == "frozen" and result.suggestion in result.lrs
    assert len(result.lrs) >= 10 and all(math.isfinite(v) for v in result.losses)
    assert setup.cfg.out is None and list(cwd.iterdir()) == []


def test_suggestion_is_steepest_descent_of_smoothed_loss():
    lrs = [10.0**e for e in range(-7, 3)]
    losses = [2.0, 2.0, 1.99, 1.9, 1.2, 1.0, 0.95, 1.5, 3.0, 9.0]  # steepest drop around 1e-3
    result = _suggest(lrs, losses, losses, "frozen", "m")
    assert result.suggestion == pytest.approx(1e-3)
    assert result.min_loss_lr == pytest.approx(1e-1 / 10)


def test_diverging_at_once_is_a_clear_error():
    with pytest.raises(UserError, match="diverged"):
        _suggest([1e-3, 1e-2], [1.0, 9.0], [1.0, 9.0], "frozen", "m")


def test_bad_range_is_a_user_error(three_classes):
    with pytest.raises(UserError, match="start_lr < end_lr"):
        visiontune.lr_find(three_classes, start_lr=1.0, end_lr=1e-3, **TINY_OPTIONS)


def test_train_lr_auto_writes_the_number_used(three_classes, tmp_path):
    run_dir = tmp_path / "run"
    options = {**TINY_OPTIONS, "epochs": 2, "lr": "auto"}  # a frozen epoch, then an unfrozen one
    run = visiontune.fit(three_classes, out=str(run_dir), **options)
    lr = yaml.safe_load((run.dir / "config.yaml").read_text())["lr"]
    assert isinstance(lr, float) and 1e-7 <= lr <= 10.0
    found = json.loads((run_dir / "lr_find.json").read_text())
    assert found["suggestion"] == lr
    assert found["stage"] == "unfrozen"  # --lr auto tests the stage whose lr can wreck the features
    assert (run_dir / "lr_find.png").is_file()
    assert run.config.lr == lr


def test_lr_option_accepts_numbers_and_auto_only():
    assert visiontune.TrainConfig(lr="3e-4").lr == pytest.approx(3e-4)
    assert visiontune.TrainConfig(lr="auto").lr == "auto"
    with pytest.raises(UserError, match="positive number or 'auto'"):
        visiontune.fit("x", lr="fast")
