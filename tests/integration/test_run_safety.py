"""A run stops with one line and stays resumable: failing transforms, full disks, a second process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune import io as atomic_io
from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError
from visiontune.locking import LOCK_NAME
from visiontune.training import checkpoint
from visiontune.training.failures import summary

OPTIONS = {**TINY_OPTIONS, "epochs": 2, "freeze_epochs": 0, "augment": "light"}


@pytest.fixture
def data(tmp_path):
    return write_class_folders(tmp_path / "data", {"blue": 12, "red": 12})


class FailsAfter:
    """A train transform that raises on its `n`-th call, like torchvision's bicubic TrivialAugment did."""

    def __init__(self, transform, n: int) -> None:
        self.transform, self.n, self.calls = transform, n, 0

    def __call__(self, image):
        self.calls += 1
        if self.calls >= self.n:
            raise ValueError("Interpolation mode 'bicubic' is unsupported with Tensor input")
        return self.transform(image)


def _failing_transform(monkeypatch, n: int) -> None:
    original = Preprocessing.train_transform
    monkeypatch.setattr(Preprocessing, "train_transform", lambda self, *a, **k: FailsAfter(original(self, *a, **k), n))


@pytest.mark.parametrize("workers", [0, 1])
def test_transform_failure_mid_epoch_is_one_message_and_the_run_resumes(data, tmp_path, monkeypatch, workers):
    _failing_transform(monkeypatch, n=30 if workers == 0 else 3)  # epoch 2 in-process; a worker's 3rd image
    with pytest.raises(UserError) as caught:
        visiontune.fit(data, out=str(tmp_path / "run"), **{**OPTIONS, "workers": workers})
    message = str(caught.value)
    assert "\n" not in message and "training stopped" in message
    assert "TransformError: the transform failed on " in message and "bicubic" in message
    if workers == 0:
        assert f"--resume {tmp_path / 'run'}" in message and (tmp_path / "run" / "error.log").is_file()
        monkeypatch.undo()
        run = visiontune.fit(resume=tmp_path / "run", progress=False)
        assert run.summary["epochs_run"] == 2
    else:  # nothing completed: the same --out starts it again
        assert "start it again with the same --out" in message
        monkeypatch.undo()
        assert visiontune.fit(data, out=str(tmp_path / "run"), **OPTIONS).summary["epochs_run"] == 2


def test_worker_error_summary_is_the_workers_last_line():
    exc = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                     '  File "x.py", line 1, in f\nvisiontune.data.dataset.TransformError: the transform failed on a.png')
    assert summary(exc) == "TransformError: the transform failed on a.png"
    assert summary(RuntimeError("one\ntwo")) == "RuntimeError: one"


# What locked_dir does, without importing visiontune (seconds on a busy machine).
HOLD = """
import fcntl, json, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".visiontune.lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "started": "now", "command": "visiontune train"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """Hold a directory's lock in another process, as a second `train` would see it."""
    procs = []

    def hold(directory):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_process_on_the_same_out_stops_and_a_dead_holder_does_not(data, tmp_path, held):
    holder = held(tmp_path / "run")
    with pytest.raises(UserError, match=rf"in use by another visiontune process \(pid {holder.pid} "):
        visiontune.fit(data, out=str(tmp_path / "run"), **OPTIONS)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]  # nothing of ours written
    holder.kill()
    holder.wait()  # its lock file stays behind, with a dead pid: not stale, the kernel released it
    assert visiontune.fit(data, out=str(tmp_path / "run"), **OPTIONS).summary["epochs_run"] == 2


def test_resume_anomaly_tune_and_compare_take_the_lock_too(data, tmp_path, held):
    from visiontune import anomaly
    from visiontune.comparison import compare
    from visiontune.tune.search import tune

    for name in ("anomaly", "tune", "compare"):
        held(tmp_path / name)
    tiny = {k: v for k, v in OPTIONS.items() if k not in ("progress", "model")}
    calls = {
        "anomaly": lambda: anomaly.fit(data / "red", method="padim", backbone="test_resnet", pretrained=False,
                                       out=tmp_path / "anomaly", workers=0),
        "tune": lambda: tune(data, trials=1, out=tmp_path / "tune", progress=False, model="test_resnet", **tiny),
        "compare": lambda: compare(data, models="test_resnet", out=tmp_path / "compare", progress=False, **tiny),
    }
    for name, call in calls.items():
        with pytest.raises(UserError, match="in use by another visiontune process"):
            call()
    visiontune.fit(data, out=str(tmp_path / "run"), **{**OPTIONS, "epochs": 1})
    held(tmp_path / "run")
    with pytest.raises(UserError, match="in use by another visiontune process"):
        visiontune.fit(resume=tmp_path / "run", progress=False)


def test_run_that_fails_before_writing_leaves_no_folder(data, tmp_path):
    with pytest.raises(UserError):
        visiontune.fit(data, out=str(tmp_path / "run"), **{**OPTIONS, "weights": str(tmp_path / "missing.pt")})
    weights = tmp_path / "bad.pt"
    weights.write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="refusing to load"):  # any pickle it cannot vouch for
        visiontune.fit(data, out=str(tmp_path / "run"), **{**OPTIONS, "weights": str(weights)})
    assert not (tmp_path / "run").exists()


def test_full_disk_at_epoch_2_is_one_line_and_resume_continues(data, tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos", with no errno: the free space tells."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second state.pt: epoch 2
            with open(path, "wb") as handle:
                handle.write(b"partial")
            monkeypatch.setattr(atomic_io, "_free_bytes", lambda folder: 4096)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError) as caught:
        visiontune.fit(data, out=str(tmp_path / "run"), **{**OPTIONS, "epochs": 3})
    message = str(caught.value)
    assert f"cannot write {tmp_path / 'run' / 'checkpoints' / 'state.pt'}: no space left on the disk" in message
    assert f"continue with: visiontune train --resume {tmp_path / 'run'}" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "best.safetensors", "last.safetensors", "state.pt"]  # no temporary left, the old state intact
    monkeypatch.undo()
    assert checkpoint.load_state(tmp_path / "run" / "checkpoints" / "state.pt")["epoch"] == 1
    assert visiontune.fit(resume=tmp_path / "run", progress=False).summary["epochs_run"] == 3


def test_atomic_write_names_the_disk_for_safetensors_errno_words(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("old")

    def write(tmp):
        raise OSError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    with pytest.raises(atomic_io.DiskFullError, match=f"cannot write {target}: no space left on the disk holding {tmp_path}"):
        atomic_io.atomic_write(target, write)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with pytest.raises(ValueError):  # other failures stay what they are
        atomic_io.atomic_write(target, lambda tmp: (_ for _ in ()).throw(ValueError("bug")))
