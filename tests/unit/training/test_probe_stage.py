"""Linear probe then fine-tuning: the probe is epoch 0, and it is kept when no epoch beats it."""

from __future__ import annotations

import csv

import lightning.fabric
import pytest
import torch
from torch import nn

import visiontune
from tests.conftest import TINY_MODEL, TINY_OPTIONS, write_class_folders
from visiontune.config import LEGACY_DEFAULTS, TrainConfig
from visiontune.errors import UserError
from visiontune.evaluation.report import write_report
from visiontune.models.backbones import create_classifier

PROBED = {**TINY_OPTIONS, "probe": True, "freeze_epochs": 0, "feature_precision": "fp32"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("probe") / "data", {"blue": 10, "green": 10, "red": 10})


def rows(run) -> list[dict]:
    with (run.dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_probe_is_epoch_zero_and_fine_tuning_starts_from_it(data, tmp_path):
    starts = []

    class FirstEpoch:
        def on_epoch_end(self, tuner, record):
            starts.append(record["epoch"])

    run = visiontune.fit(data, out=str(tmp_path / "run"), callbacks=[FirstEpoch()], **{**PROBED, "epochs": 1})
    history = rows(run)
    assert [(r["epoch"], r["stage"]) for r in history] == [("0", "probe"), ("1", "unfrozen")]
    assert starts == [0, 1]  # callbacks (tune's pruning, benchmarks) see the probe as epoch 0
    probe = run.summary["probe"]
    assert probe["chosen"]["C"] in [c["C"] for c in probe["candidates"]]
    assert float(history[0]["val_accuracy"]) == pytest.approx(probe["val_accuracy"])
    assert probe["val_accuracy"] == 1.0  # colours are linearly separable from any features
    assert run.summary["kept"] in ("probe", "fine-tuned")


def test_probe_is_kept_when_fine_tuning_never_beats_it(data, tmp_path):
    # an absurd lr wrecks every fine-tuned epoch, so the best-on-validation model is the probe
    run = visiontune.fit(data, out=str(tmp_path / "run"), **{**PROBED, "epochs": 2, "lr": 50.0, "lr_mult": 1.0})
    assert run.summary["best_epoch"] == 0 and run.summary["kept"] == "probe"
    assert run.summary["val"]["accuracy"] == pytest.approx(run.summary["probe"]["val_accuracy"])
    assert run.summary["val"]["loss"] == pytest.approx(run.summary["probe"]["val_loss"], rel=1e-4)
    best, last = run.load_model("best").state_dict(), run.load_model("last").state_dict()
    assert any(not torch.equal(best[name], last[name]) for name in best)  # the wrecked weights were not kept
    assert "Kept: the linear probe (epoch 0)" in write_report(run).read_text()


def test_resume_after_the_probe_does_not_fit_it_again(data, tmp_path):
    class Stop(Exception):
        pass

    class StopAfterFirst:
        def on_epoch_end(self, tuner, record):
            raise Stop

    with pytest.raises(Stop):
        visiontune.fit(data, out=str(tmp_path / "run"), callbacks=[StopAfterFirst()], **{**PROBED, "epochs": 2})
    run = visiontune.fit(resume=tmp_path / "run", progress=False)
    assert [r["stage"] for r in rows(run)] == ["probe", "unfrozen", "unfrozen"]


@pytest.mark.parametrize("bn", ["inference", "batch"])
def test_bn_option_decides_whether_running_statistics_move(data, tmp_path, bn):
    run = visiontune.fit(data, out=str(tmp_path / bn), **{**PROBED, "epochs": 1, "bn": bn, "lr": 1e-2})
    lightning.fabric.seed_everything(PROBED.get("seed", 0), verbose=False)  # as fit seeds before creating it
    initial = create_classifier(TINY_MODEL, 3, pretrained=False)
    trained = run.load_model("last")
    pairs = [(a, b) for a, b in zip(initial.modules(), trained.modules()) if isinstance(a, nn.BatchNorm2d)]
    assert pairs
    moved = any(not torch.equal(a.running_mean, b.running_mean) for a, b in pairs)
    affine_trained = any(not torch.equal(a.weight, b.weight) for a, b in pairs)
    assert moved == (bn == "batch")
    assert affine_trained  # scale and shift train in both modes


def test_lr_find_on_the_unfrozen_stage(data, tmp_path):
    result = visiontune.lr_find(data, start_lr=1e-5, end_lr=1.0, steps=20, stage="unfrozen", **PROBED)
    assert result.stage == "unfrozen" and "backbone at lr / lr_mult" in result.notes[0]
    with pytest.raises(UserError, match="no frozen stage"):
        visiontune.lr_find(data, steps=20, stage="frozen", **PROBED)


def test_probe_and_bn_defaults_follow_the_weights():
    assert TrainConfig(model="resnet18").use_probe and not TrainConfig(model="resnet18", pretrained=False).use_probe
    assert TrainConfig(model="resnet18", pretrained=False, probe=True).use_probe
    assert TrainConfig(model="resnet18").bn_statistics == "inference"
    assert TrainConfig(model="resnet18", pretrained=False).bn_statistics == "batch"
    assert TrainConfig(model="resnet18", pretrained=False, bn="inference").bn_statistics == "inference"


def test_a_run_from_before_the_probe_resumes_the_old_way(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: resnet18\nepochs: 4\n")  # written before probe / bn / crop_mode existed
    old = TrainConfig.from_yaml(config, missing=LEGACY_DEFAULTS)
    assert (old.use_probe, old.bn_statistics, old.crop_mode) == (False, "batch", "center")
    assert TrainConfig.from_yaml(config).use_probe  # a new run from that file gets today's defaults
