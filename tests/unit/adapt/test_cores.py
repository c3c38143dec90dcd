"""The pure-torch cores of adapt: the MCC loss, AdaBN's statistics, and the epoch-keeping rule."""

from __future__ import annotations

import torch
from torch import nn

from visiontune.adapt.batchnorm import recompute_batch_norm_statistics
from visiontune.adapt.loop import choose_epoch
from visiontune.adapt.workflow import source_drop_warning
from visiontune.adapt.mcc import MinimumClassConfusionLoss


def test_mcc_is_zero_for_confident_distinct_classes_and_high_when_hedging():
    loss = MinimumClassConfusionLoss()
    confident = torch.eye(3).repeat(4, 1) * 100
    assert loss(confident).item() < 1e-6
    assert loss(torch.zeros(12, 3)).item() > 0.6  # uniform predictions: (3 - 1) / 3 of the mass off-diagonal


def test_adabn_sets_running_statistics_to_the_target_average_and_touches_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3, 5, 5) + 3 for _ in range(4)]
    assert recompute_batch_norm_statistics(model, batches) == 4
    with torch.no_grad():
        features = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not model.training and model[1].momentum == 0.1
    after = model.state_dict()
    assert [k for k in after if not torch.equal(after[k], before[k])] == ["1.running_mean", "1.running_var",
                                                                          "1.num_batches_tracked"]


def record(epoch, source, entropy, target=None):
    return {"epoch": epoch, "source_val_accuracy": source, "target_entropy": entropy, "target_val_accuracy": target}


def test_without_target_labels_the_lowest_entropy_near_the_best_source_accuracy_is_kept():
    records = [record(0, 0.90, 0.9), record(1, 0.89, 0.5), record(2, 0.80, 0.1), record(3, 0.91, 0.6)]
    index, criterion = choose_epoch(records, trained_on_target_labels=False)
    assert index == 1 and "target_entropy" in criterion and "0.02" in criterion


def test_the_confident_source_model_does_not_win_on_entropy():
    records = [record(0, 0.96, 0.14), record(1, 0.95, 0.19), record(2, 0.94, 0.18)]
    assert choose_epoch(records, trained_on_target_labels=False)[0] == 2


def test_trained_on_target_labels_without_target_validation_the_last_epoch_is_kept():
    records = [record(0, 0.96, 0.1), record(1, 0.70, 0.3), record(2, 0.65, 0.2)]
    index, criterion = choose_epoch(records, trained_on_target_labels=True)
    assert index == 2 and "last epoch" in criterion


def test_with_labelled_target_validation_its_accuracy_decides():
    records = [record(0, 0.9, 0.2, 0.5), record(1, 0.7, 0.9, 0.8), record(2, 0.6, 0.4, 0.8)]
    index, criterion = choose_epoch(records, trained_on_target_labels=True)
    assert index == 2 and "target_val_accuracy" in criterion  # tie on accuracy: the lower entropy


def test_a_large_source_drop_without_target_validation_is_warned_about():
    records = [record(0, 0.96, 0.16), record(1, 0.65, 0.33)]
    assert "lost 0.31 of source validation accuracy" in source_drop_warning(records, 1)
    assert source_drop_warning([record(0, 0.96, 0.1), record(1, 0.90, 0.2)], 1) is None  # within 0.1
    assert source_drop_warning([record(0, 0.96, 0.1, 0.5), record(1, 0.6, 0.2, 0.9)], 1) is None  # target val decides
