"""DDP on the CPU (gloo) with real processes: two processes with global batch B train as one does
with batch B, rank 0 alone writes, and a two-process resume (here launched as two "nodes" on
127.0.0.1, as torchrun / fabric run would) continues exactly.

Processes are started through ddp_script.py, never by re-running pytest. One reference run is
in this process; the two-process runs share a module fixture (each costs two interpreter starts).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from tests.integration.test_cli import cli

SCRIPT = Path(__file__).with_name("ddp_script.py")
ROOT = Path(__file__).parents[2]
# bn inference: the CPU has no SyncBatchNorm, so batch statistics would be per process (B/2 samples);
# threads pinned: a different reduction order changes the last digits compared exactly below
OPTIONS = {**TINY_OPTIONS, "bn": "inference", "threads": 1, "epochs": 2, "freeze_epochs": 1}
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # two processes vs one: gradients averaged in another order
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(spec: dict, cwd: Path, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
        "HF_HUB_OFFLINE": "1", **env,
    }
    environment.setdefault("MASTER_PORT", str(free_port()))
    # a session of its own: a hung run is killed with the processes Fabric started for it
    return subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(spec)], cwd=cwd, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, expected: int = 0) -> None:
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == expected, output[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    """metrics.csv's rows without the timings."""
    with open(run_dir / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(handle)]


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process in this one; two processes (--devices 2) whole, and stopped after epoch 1."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_class_folders(root / "data", {"blue": 12, "red": 12})
    two = {"data": str(data), "options": {**OPTIONS, "devices": 2}}
    whole = start({**two, "options": {**two["options"], "out": str(root / "whole")}}, root / "data")
    cut = start({**two, "options": {**two["options"], "out": str(root / "cut")}, "stop_after": 1}, root / "data")
    visiontune.fit(data, out=str(root / "one"), **OPTIONS)
    finish(whole)
    finish(cut, expected=3)
    return root


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(runs):
    one, two = metrics(runs / "one"), metrics(runs / "whole")
    assert [row["stage"] for row in two] == ["frozen", "unfrozen"]
    for a, b in zip(one, two):
        for name in METRICS:
            torch.testing.assert_close(float(b[name]), float(a[name]), **TOLERANCE, msg=name)
    reference = visiontune.load_run(runs / "one").load_model("last").state_dict()
    for name, tensor in visiontune.load_run(runs / "whole").load_model("last").state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
    summary = json.loads((runs / "whole" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["val"]["accuracy"] == json.loads((runs / "one" / "summary.json").read_text())["val"]["accuracy"]


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    assert files(runs / "whole") == files(runs / "one")  # the same files, none twice or per rank
    assert not any(path.name.startswith(".visiontune") for path in (runs / "whole").iterdir())  # lock released
    # nothing beside the run directories, nor in the data folder the processes ran in
    assert {path.name for path in runs.iterdir()} == {"data", "one", "whole", "cut"}
    assert {path.name for path in (runs / "data").iterdir()} == {"blue", "red"}


@pytest.mark.slow
def test_two_process_resume_as_two_nodes_continues_exactly(runs):
    """Stopped after epoch 1 under --devices 2, resumed as --num-nodes 2 --devices 1 (NODE_RANK 0 and 1)."""
    cut = runs / "cut"
    assert [row["epoch"] for row in metrics(cut)] == ["1"] and not (cut / "summary.json").exists()
    port = str(free_port())
    spec = {"resume": str(cut), "options": {"num_nodes": 2, "devices": 1}}
    nodes = [start(spec, runs / "data", NODE_RANK=str(rank), MASTER_PORT=port) for rank in (0, 1)]
    for node in nodes:
        finish(node)
    assert metrics(cut) == metrics(runs / "whole")  # the same numbers to the last digit
    whole = visiontune.load_run(runs / "whole").load_model("last").state_dict()
    for name, tensor in visiontune.load_run(cut).load_model("last").state_dict().items():
        torch.testing.assert_close(tensor, whole[name], rtol=0, atol=0, msg=name)
    assert json.loads((cut / "summary.json").read_text())["val"] == json.loads((runs / "whole" / "summary.json").read_text())["val"]
    assert files(cut) == files(runs / "whole")


@pytest.mark.slow
def test_a_batch_the_processes_cannot_share_is_refused_before_any_starts(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 4, "red": 4})
    done = cli("train", data, "--model", TINY_OPTIONS["model"], "--no-pretrained", "--devices", "3",
               "--batch-size", "8", "--out", tmp_path / "run")
    assert done.returncode == 2 and "must divide by the 3 processes" in done.stderr
    assert "Initializing distributed" not in done.stderr + done.stdout and not (tmp_path / "run").exists()
