"""Interrupted runs resume exactly, also across the frozen -> unfrozen boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.errors import UserError

# threads pinned: the default follows the cores free at the moment, and a different reduction order
# changes the last digits of the loss compared exactly below
OPTIONS = {**TINY_OPTIONS, "epochs": 4, "freeze_epochs": 2, "augment": "light", "lr": 3e-3, "threads": 1}


class Interrupted(Exception):
    pass


class Snapshot:
    """Per epoch: freezing state, parameter groups and their lrs, optimizer step counter."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.epochs = stop_after, {}

    def on_epoch_end(self, trainer, record):
        optimizer = trainer.setup.optimizer
        head_param = next(p for g in optimizer.param_groups if g["name"] == "head" for p in g["params"])
        self.epochs[record["epoch"]] = {
            "stage": trainer.setup.stage_of(record["epoch"] - 1)[0],
            "requires_grad": {n: p.requires_grad for n, p in trainer.setup.model.named_parameters()},
            "groups": [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups],
            "step": float(optimizer.state[head_param]["step"]),
            "val_loss": record["val_loss"],
        }
        if record["epoch"] == self.stop_after:
            raise Interrupted


@pytest.fixture
def data(tmp_path):
    return write_class_folders(tmp_path / "data", {"blue": 12, "red": 12})


def test_resume_across_unfreeze_equals_uninterrupted_run(data, tmp_path):
    whole = Snapshot()
    reference = visiontune.fit(data, out=str(tmp_path / "whole"), callbacks=[whole], **OPTIONS)

    first = Snapshot(stop_after=1)  # killed in the frozen stage
    with pytest.raises(Interrupted):
        visiontune.fit(data, out=str(tmp_path / "cut"), callbacks=[first], **OPTIONS)
    second = Snapshot()
    resumed = visiontune.fit(resume=tmp_path / "cut", callbacks=[second], progress=False)

    assert sorted(second.epochs) == [2, 3, 4]  # continues after the last completed epoch
    assert [second.epochs[e]["stage"] for e in (2, 3, 4)] == ["frozen", "unfrozen", "unfrozen"]
    for epoch in (2, 3, 4):
        assert second.epochs[epoch] == whole.epochs[epoch], f"epoch {epoch} differs after resume"
    for name, tensor in reference.load_model("last").state_dict().items():
        torch.testing.assert_close(resumed.load_model("last").state_dict()[name], tensor, msg=name)
    assert resumed.summary["best_epoch"] == reference.summary["best_epoch"]
    assert resumed.summary["epochs_run"] == 4


def test_resume_refuses_finished_and_foreign_directories(data, tmp_path):
    visiontune.fit(data, out=str(tmp_path / "done"), **{**OPTIONS, "epochs": 1, "freeze_epochs": 1})
    with pytest.raises(UserError, match="already finished"):
        visiontune.fit(resume=tmp_path / "done")
    with pytest.raises(UserError, match="not a visiontune run"):
        visiontune.fit(resume=data)


@pytest.mark.slow
def test_killed_process_resumes_from_last_checkpoint(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 60, "red": 60})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "visiontune.cli.main", "train", str(data), "--model", "test_resnet",
           "--no-pretrained", "--image-size", "64", "--epochs", "4", "--freeze-epochs", "2", "--no-probe",
           "--workers", "0", "--batch-size", "8", "--out", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run_dir / "checkpoints" / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # mid-epoch 2, inside the frozen stage
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    assert torch.load(state, weights_only=True)["epoch"] == 1

    done = subprocess.run(cmd[:4] + ["--resume", str(run_dir)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    run = visiontune.load_run(run_dir)
    assert run.summary["epochs_run"] == 4
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in lines[1:]] == [
        ["1", "frozen"], ["2", "frozen"], ["3", "unfrozen"], ["4", "unfrozen"]
    ]
