"""EarlyStopping, and checkpoint files: atomic writes, model files with metadata, resume state."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import timm
import torch

from tests.conftest import TINY_MODEL
from visiontune.errors import UserError
from visiontune.io import atomic_write
from visiontune.training.callbacks import EarlyStopping
from visiontune.training.checkpoint import (
    load_model_file,
    load_state,
    save_model,
    save_state,
)


def run(stopper: EarlyStopping, values: list[float]) -> list[bool]:
    return [stopper.update(epoch, value) for epoch, value in enumerate(values, start=1)]


# -- EarlyStopping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("monitor", "values", "improved", "best", "best_epoch"),
    [
        ("val_loss", [1.0, 0.8, 0.9, 0.7, 0.75], [True, True, False, True, False], 0.7, 4),
        ("val_accuracy", [0.5, 0.7, 0.6, 0.7, 0.9], [True, True, False, False, True], 0.9, 5),
        ("val_f1_macro", [0.3, 0.2], [True, False], 0.3, 1),
    ],
)
def test_early_stopping_tracks_the_best_in_the_monitors_direction(monitor, values, improved, best, best_epoch):
    stopper = EarlyStopping(monitor)
    assert run(stopper, values) == improved
    assert (stopper.best, stopper.best_epoch) == (best, best_epoch)
    assert not stopper.should_stop  # no patience: never stops


def test_patience_counts_epochs_without_improvement():
    stopper = EarlyStopping("val_loss", patience=2)
    run(stopper, [1.0, 1.1])
    assert stopper.bad_epochs == 1 and not stopper.should_stop
    stopper.update(3, 0.9)  # an improvement resets the count
    assert stopper.bad_epochs == 0
    stopper.update(4, 0.95)
    stopper.update(5, 0.9)  # equal is not better
    assert stopper.should_stop and stopper.best_epoch == 3


def test_min_delta_requires_a_real_improvement():
    stopper = EarlyStopping("val_loss", min_delta=0.1)
    assert run(stopper, [1.0, 0.95, 0.85]) == [True, False, True]
    assert stopper.best == 0.85


def test_nan_is_never_best():
    stopper = EarlyStopping("val_loss")
    assert run(stopper, [math.nan, math.nan]) == [False, False]
    assert stopper.best_epoch is None and stopper.best == math.inf


def test_accuracy_ties_go_to_the_lower_val_loss_without_resetting_patience():
    stopper = EarlyStopping("val_accuracy", patience=2)
    assert stopper.update(1, 0.9, loss=0.40)
    assert not stopper.update(2, 0.9, loss=0.45)  # same accuracy, worse loss: keep epoch 1
    assert stopper.update(3, 0.9, loss=0.30)  # same accuracy, better loss: new best checkpoint
    assert stopper.best_epoch == 3 and stopper.best_loss == 0.30
    assert stopper.bad_epochs == 2 and stopper.should_stop  # but no real progress since epoch 1


def test_early_stopping_state_round_trip(tmp_path):
    stopper = EarlyStopping("val_accuracy", patience=3)
    run(stopper, [0.5, 0.8, 0.7])
    save_state(tmp_path / "s.pt", {"early_stopping": stopper.state_dict()})
    resumed = EarlyStopping("val_accuracy", patience=3)
    resumed.load_state_dict(load_state(tmp_path / "s.pt")["early_stopping"])
    assert resumed.state_dict() == {"best": 0.8, "best_loss": math.inf, "best_epoch": 2, "bad_epochs": 1}
    for stepper in (stopper, resumed):
        stepper.update(4, 0.6)
        stepper.update(5, 0.6)
    assert resumed.state_dict() == stopper.state_dict() and resumed.should_stop


# -- model files ---------------------------------------------------------------------------------


def test_save_model_round_trip_with_metadata(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(TINY_MODEL, pretrained=False, num_classes=3)
    metadata = {"labels": ["blue", "green", "red"], "image_size": 32, "mean": [0.5, 0.5, 0.5], "model": TINY_MODEL}
    path = tmp_path / "checkpoints" / "best.safetensors"  # the folder is created
    save_model(path, model, metadata)
    state, loaded_meta = load_model_file(path)
    assert loaded_meta == metadata
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert os.listdir(path.parent) == ["best.safetensors"]


# -- atomic_write --------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("old")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("half of the new")
        raise KeyboardInterrupt  # even an interrupt leaves no temp file

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_write_replaces_the_file_when_the_writer_succeeds(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("old")
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["state.pt"]


# -- resume state --------------------------------------------------------------------------------


def trained_adamw() -> torch.optim.AdamW:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(
        [{"params": [model.weight], "lr_scale": 1.0, "name": "head"}, {"params": [model.bias], "weight_decay": 0.0}],
        lr=1e-3,
    )
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    return optimizer


def test_optimizer_state_round_trip(tmp_path):
    optimizer = trained_adamw()
    original = optimizer.state_dict()
    save_state(tmp_path / "state.pt", {"optimizer": original, "epoch": 3, "history": [{"val_loss": 0.5}]})
    loaded = load_state(tmp_path / "state.pt")
    assert loaded["epoch"] == 3 and loaded["history"] == [{"val_loss": 0.5}]
    assert loaded["optimizer"]["param_groups"] == original["param_groups"]
    for index, slots in original["state"].items():
        for key, value in slots.items():
            assert torch.equal(loaded["optimizer"]["state"][index][key], value), (index, key)
    fresh = trained_adamw()
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], original["state"][0]["exp_avg"])


class Payload:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_state_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"epoch": 1, "callback": Payload(marker)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match=r"state\.pt was refused: it is damaged or holds pickled objects"):
        load_state(tmp_path / "state.pt")
    assert not marker.exists()


def test_atomic_write_gives_files_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
