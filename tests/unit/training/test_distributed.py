"""The pieces of DDP training that need no second process: the sharded sampler keeps the weighted
sampler's draws (and so its class balance), the joined evaluation counts each sample once, and
the epoch sums kept on the device give the numbers the per-step `.item()` loop gave."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset, WeightedRandomSampler

from visiontune.config import build_config
from visiontune.errors import UserError
from visiontune.models.losses import ClassificationLoss
from visiontune.training.distributed import Indexed, first_of_each, per_process_batch, shard_sampler
from visiontune.training.finetune import _relaunched
from visiontune.training.loop import EpochResult, evaluate, train_one_epoch


@pytest.fixture(scope="module")
def fabric():
    return Fabric(accelerator="cpu", devices=1, precision="32-true")


def weighted_sampler(targets: list[int], generator: torch.Generator) -> WeightedRandomSampler:
    counts = np.bincount(targets)
    return WeightedRandomSampler([1.0 / counts[t] for t in targets], len(targets), generator=generator)


def test_sharded_weighted_sampler_keeps_the_draws_and_their_class_balance():
    targets = [0] * 900 + [1] * 100  # 9:1 imbalance, drawn balanced
    generator = torch.Generator()
    generator.manual_seed(7)
    single = list(BatchSampler(weighted_sampler(targets, generator), 8, drop_last=True))
    shares = []
    for rank in (0, 1):
        generator.manual_seed(7)  # every rank seeds the sampler's generator alike (prepare_epoch)
        sharded = shard_sampler(weighted_sampler(targets, generator), SimpleNamespace(world_size=2, global_rank=rank), True)
        shares.append(list(BatchSampler(sharded, 4, drop_last=True)))
    assert len(shares[0]) == len(shares[1]) == len(single)
    for batch, first, second in zip(single, *shares):  # the two shares of a batch are the one-process batch
        assert sorted(first + second) == sorted(batch)
    for share in shares:
        minority = np.mean([targets[i] for batch in share for i in batch])
        assert abs(minority - 0.5) < 0.06  # balanced per process as well, not just overall


def test_single_process_sampler_is_left_alone():
    sampler = weighted_sampler([0, 0, 1], torch.Generator())
    assert shard_sampler(sampler, SimpleNamespace(world_size=1, global_rank=0), True) is sampler


def test_global_batch_must_divide_by_the_processes():
    assert per_process_batch(32, 4) == 8
    with pytest.raises(UserError, match="global batch"):
        per_process_batch(30, 4)


def toy_data(n: int = 22, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_first_of_each_drops_repeats_and_orders_by_index():
    indices = torch.tensor([4, 0, 2, 0, 1, 3, 4, 2])
    assert indices[first_of_each(indices)].tolist() == [0, 1, 2, 3, 4]


def test_joined_evaluation_counts_each_sample_once(fabric):
    """A rank's padded share repeats samples (DistributedSampler): the joined metrics are those of the set."""
    data, model, loss = toy_data(), nn.Linear(5, 3), ClassificationLoss(num_classes=3)
    plain = evaluate(fabric, model, DataLoader(data, 4), loss, 3)
    padded_order = list(range(len(data))) + [0, 1, 2]  # as two ranks' padded shares would hold them
    joined = evaluate(fabric, model, DataLoader(Indexed(data), 4, sampler=padded_order), loss, 3)
    assert joined.accuracy == plain.accuracy and joined.f1_macro == plain.f1_macro
    assert joined.loss == pytest.approx(plain.loss, rel=1e-6)  # per-sample sums vs batch means (float32)
    with torch.no_grad():
        x, y = data.tensors
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert joined.loss == pytest.approx(expected, rel=1e-6)


def item_per_step_epoch(fabric, model, loader, loss_fn, optimizer) -> EpochResult:
    """The loop before the sums moved to the device: `.item()` after every step."""
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for images, targets in loader:
        logits = model(images)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        steps += 1
        n = targets.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(dim=1) == targets).sum().item()
        seen += n
    return EpochResult(total_loss / max(seen, 1), correct / max(seen, 1), steps=steps)


def item_per_step_evaluate(model, loader, loss_fn, num_classes) -> EpochResult:
    total_loss, preds, targets_all = 0.0, [], []
    with torch.inference_mode():
        for images, targets in loader:
            logits = model(images)
            total_loss += loss_fn(logits, targets).item() * targets.shape[0]
            preds.append(logits.argmax(dim=1))
            targets_all.append(targets)
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets_all).numpy()
    f1 = f1_score(y_true, y_pred, labels=np.arange(num_classes), average="macro", zero_division=0)
    return EpochResult(total_loss / len(y_true), float((y_pred == y_true).mean()), float(f1))


def test_device_sums_give_the_numbers_of_the_per_step_item_loop(fabric):
    torch.manual_seed(0)
    batches = [tuple(t) for t in DataLoader(toy_data(30), 7)]  # a fixed batch list, the last one short
    model = nn.Linear(5, 3)
    twin = copy.deepcopy(model)
    loss_fn = ClassificationLoss(num_classes=3, class_weights=torch.tensor([1.0, 2.0, 0.5]))
    new = train_one_epoch(fabric, model, batches, loss_fn, torch.optim.SGD(model.parameters(), lr=0.5), lambda i: None)
    old = item_per_step_epoch(fabric, twin, batches, loss_fn, torch.optim.SGD(twin.parameters(), lr=0.5))
    assert new == old  # to the last digit: float64 sums, as the Python floats were
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    eval_loss = ClassificationLoss(num_classes=3)
    assert evaluate(fabric, model, batches, eval_loss, 3) == item_per_step_evaluate(model, batches, eval_loss, 3)


def test_progress_gets_running_numbers_every_few_steps_only(fabric, monkeypatch):
    monkeypatch.setattr("visiontune.training.loop.PROGRESS_EVERY", 2)
    batches = [tuple(t) for t in DataLoader(toy_data(30), 5)]
    model, seen = nn.Linear(5, 3), []
    train_one_epoch(fabric, model, batches, ClassificationLoss(num_classes=3),
                    torch.optim.SGD(model.parameters(), lr=0.1), lambda i: None, on_batch=seen.append)
    assert [stats is None for stats in seen] == [True, False] * 3
    assert all(0 <= stats[1] <= 1 for stats in seen if stats)


def test_launch_options_parse_and_are_all_a_resume_may_change():
    assert build_config({"devices": "4"}).devices == 4 and build_config({"devices": "auto"}).devices == "auto"
    with pytest.raises(UserError, match="devices must be a whole number"):
        build_config({"devices": "0"})
    with pytest.raises(UserError, match="strategy"):
        build_config({"strategy": "fsdp"})
    cfg = build_config({"data": "x"})
    assert _relaunched(cfg, {"devices": 2, "num_nodes": 2}).num_nodes == 2
    with pytest.raises(UserError, match="only devices, num_nodes, strategy may change"):
        _relaunched(cfg, {"devices": 2, "epochs": 3})
