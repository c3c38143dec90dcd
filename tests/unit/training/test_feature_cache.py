"""The cached-feature frozen stage trains the same head as running the frozen backbone every epoch."""

from __future__ import annotations

import torch

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.models.backbones import head_parameter_names
from visiontune.training.setup import TrainingSetup
from visiontune.training.trainer import Trainer

# Same seed, no augmentation, BatchNorm frozen in both paths: the only differences are float
# summation orders (batched features vs per-batch backbone runs), so heads agree to ~1e-6.
HEAD_TOLERANCE = 1e-5


class HeadAfterEachEpoch:
    def __init__(self) -> None:
        self.heads: list[dict[str, torch.Tensor]] = []
        self.records: list[dict] = []

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        self.heads.append({k: v.detach().clone() for k, v in trainer.setup.model.get_classifier().state_dict().items()})
        self.records.append(record)


def _train(data, out, **options) -> HeadAfterEachEpoch:
    capture = HeadAfterEachEpoch()
    visiontune.fit(data, out=str(out), callbacks=[capture], **{**TINY_OPTIONS, **options})
    return capture


def test_cached_frozen_stage_trains_the_same_head_as_the_backbone_path(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 14, "green": 14, "red": 14})
    options = dict(epochs=3, freeze_epochs=3, train_bn=False, augment="none", lr=1e-2, batch_size=5)
    slow = _train(data, tmp_path / "slow", feature_cache=False, **options)
    fast = _train(data, tmp_path / "fast", feature_cache=True, feature_precision="fp32", **options)
    assert len(slow.heads) == len(fast.heads) == 3
    for slow_head, fast_head in zip(slow.heads, fast.heads):
        for name in slow_head:
            torch.testing.assert_close(fast_head[name], slow_head[name], rtol=0, atol=HEAD_TOLERANCE)
    for a, b in zip(slow.records, fast.records):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5
        assert a["val_accuracy"] == b["val_accuracy"]
    # the head did move, so equality is not trivially the initial weights
    assert (fast.heads[-1]["weight"] - fast.heads[0]["weight"]).abs().max() > 1e-3


def test_cache_leaves_backbone_and_batchnorm_statistics_untouched(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 10, "red": 10})
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot:
        def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
            head = head_parameter_names(trainer.setup.model)
            snapshots.append({k: v.clone() for k, v in trainer.setup.model.state_dict().items() if k not in head})

    visiontune.fit(data, out=str(tmp_path / "run"), callbacks=[Snapshot()],
                   **{**TINY_OPTIONS, "epochs": 2, "freeze_epochs": 2, "augment": "light", "lr": 1e-2})
    before, after = snapshots
    assert any("running_mean" in name for name in before)  # BatchNorm statistics are compared too
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_augmented_views_are_cached_once_and_cycled(tmp_path, monkeypatch):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    calls = []
    real = TrainingSetup.extract_cached

    def counting(self, val=True):
        calls.append(self.cached_views)
        return real(self, val)

    monkeypatch.setattr(TrainingSetup, "extract_cached", counting)
    run = visiontune.fit(data, out=str(tmp_path / "run"),
                         **{**TINY_OPTIONS, "epochs": 4, "freeze_epochs": 3, "augment": "light"})
    assert calls == [3]  # one extraction, one view per frozen epoch
    assert "feature_cache_s" in run.summary["timings"]


def test_no_cache_when_turned_off_or_nothing_is_frozen(tmp_path, monkeypatch):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    calls = []
    monkeypatch.setattr(TrainingSetup, "extract_cached", lambda self, val=True: calls.append(1))
    visiontune.fit(data, out=str(tmp_path / "a"), **{**TINY_OPTIONS, "feature_cache": False})
    visiontune.fit(data, out=str(tmp_path / "b"), **{**TINY_OPTIONS, "freeze_epochs": 0})
    assert calls == []


def test_bf16_feature_pass_trains_nearly_the_same_head(tmp_path):
    """bf16 (the default on CPUs with native bf16) rounds features to ~3 significant digits."""
    data = write_class_folders(tmp_path / "data", {"blue": 14, "green": 14, "red": 14})
    options = dict(epochs=3, freeze_epochs=3, augment="none", lr=1e-2, batch_size=5)
    exact = _train(data, tmp_path / "fp32", feature_precision="fp32", **options)
    rounded = _train(data, tmp_path / "bf16", feature_precision="bf16", **options)
    difference = max((rounded.heads[-1][k] - exact.heads[-1][k]).abs().max().item() for k in exact.heads[-1])
    assert 0 < difference < 2e-2  # not bit-equal (bf16 did run), and close
    assert [r["val_accuracy"] for r in rounded.records] == [r["val_accuracy"] for r in exact.records]
