"""The `visiontune` command as a user meets it: messages, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

import visiontune.demo
from tests.conftest import BOMB_MAX_PIXELS, write_class_folders, write_odd_and_bad_files
from visiontune.cli.main import app

TINY_FLAGS = ["--model", "test_resnet", "--no-pretrained", "--image-size", "32", "--epochs", "1",
              "--freeze-epochs", "1", "--workers", "0", "--batch-size", "8"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "visiontune.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


class Exploit:
    """Unpickling this would create a marker file: the payload a weights loader must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_offline_pretrained_request_fails_with_one_clear_message(binary_folder, tmp_path):
    result = cli("train", binary_folder, "--model", "resnet50", "--out", tmp_path / "run")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for way_out in ("internet", "--weights", "--no-pretrained"):
        assert way_out in result.stderr
    assert not (tmp_path / "run" / "splits.csv").exists()  # stopped before touching the data


def test_pickled_payload_in_weights_is_refused(binary_folder, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    weights.write_bytes(pickle.dumps({"conv1.weight": Exploit(marker)}))
    result = cli("train", binary_folder, *TINY_FLAGS, "--weights", weights, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "refusing to load" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # a refused run leaves no empty folder behind


@pytest.mark.parametrize(
    "args, expected",
    [(["train", "DATA", "--epoch", "3"], "--epochs"),
     (["train", "/no/such/folder", "--no-pretrained"], "does not exist"),
     (["train", "DATA", "--model", "resnet5O", "--no-pretrained"], "resnet50"),
     (["train", "DATA", "--schedule", "sideways", "--no-pretrained"], "flat_cos")],
)
def test_user_mistakes_get_messages_not_tracebacks(binary_folder, args, expected):
    result = cli(*[binary_folder if a == "DATA" else a for a in args])
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_train_reads_config_and_flags_override_it(binary_folder, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: test_resnet\npretrained: false\nimage_size: 32\nepochs: 3\nworkers: 0\nlr: 0.005\n")
    result = cli("train", binary_folder, "--config", config, "--epochs", "1", "--freeze-epochs", "0",
                 "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    saved = visiontune.load_run(tmp_path / "run").config
    assert (saved.epochs, saved.lr, saved.model) == (1, 0.005, "test_resnet")
    assert "epoch 1/1" in result.stdout and "val accuracy" in result.stdout


def test_check_names_every_bad_file_and_exits_1_on_leakage(tmp_path):
    data = tmp_path / "d"
    write_class_folders(data / "train", {"blue": 6, "red": 6}, ext=".jpg")
    write_class_folders(data / "val", {"blue": 2, "red": 2}, ext=".jpg", seed=5)
    _, bad = write_odd_and_bad_files(data / "train" / "red")
    shutil.copy(data / "train/blue/blue_000.jpg", data / "val/blue/leaked.jpg")

    result = cli("check", data, "--json", "--max-pixels", BOMB_MAX_PIXELS)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert {Path(s["path"]).name for s in report["skipped"]} == bad
    assert any("leakage" in e for e in report["errors"])
    table = cli("check", data, "--max-pixels", BOMB_MAX_PIXELS)
    assert table.returncode == 1
    for name in [*bad, "leaked.jpg"]:
        assert name in table.stdout


def test_check_exits_1_when_data_cannot_be_listed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = CliRunner().invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 1
    assert "no images found" in result.output and "empty class folders: a, b" in result.output


def test_check_clean_data_exits_0(binary_folder):
    result = CliRunner().invoke(app, ["check", str(binary_folder)])
    assert result.exit_code == 0, result.output
    assert "no errors" in result.output and "blue" in result.output


def test_demo_trains_on_generated_surfaces(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("visiontune.models.backbones.cached_pretrained_file", lambda name: None)  # nothing cached
    monkeypatch.setitem(visiontune.demo.DEMO_OPTIONS, "epochs", 1)
    monkeypatch.setitem(visiontune.demo.DEMO_OPTIONS, "workers", 0)
    monkeypatch.setitem(visiontune.demo.DEMO_OPTIONS, "progress", False)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    counts = {d.name: len(list(d.iterdir())) for d in (tmp_path / "demo" / "data").iterdir()}
    assert counts == {"clean": visiontune.demo.DEMO_PER_CLASS, "scratched": visiontune.demo.DEMO_PER_CLASS}
    assert "test" in result.output and "accuracy" in result.output
    assert "pretrained tf_efficientnet_lite0 weights are not in the cache and the model hub cannot be reached: " \
           "training a small resnet10t from scratch instead" in result.output


def test_demo_fine_tunes_a_pretrained_backbone_when_weights_can_be_had(tmp_path, monkeypatch):
    used = {}

    def fit(data, **options):  # the choice is what is tested; training it is the online user's minute
        used.update(options)
        return types.SimpleNamespace(summary={})

    monkeypatch.setattr("visiontune.models.backbones.cached_pretrained_file", lambda name: "/cache/lite0.safetensors")
    monkeypatch.setattr(visiontune.demo, "make_scratch_dataset", lambda root: root)
    monkeypatch.setattr(visiontune, "fit", fit)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert used["model"] == "tf_efficientnet_lite0" and used["pretrained"]
    assert "freeze_epochs" not in used and "lr" not in used  # the product's own recipe: probe, then fine-tuning
    assert "fine-tuning pretrained tf_efficientnet_lite0" in result.output


@pytest.mark.slow
def test_heavy_augmentation_trains_a_bicubic_backbone(binary_folder, tmp_path):
    flags = [f for f in TINY_FLAGS if f != "test_resnet"]
    flags[flags.index("--model") + 1:flags.index("--model") + 1] = ["resnet10t"]  # bicubic, like resnet18/50
    result = cli("train", binary_folder, *flags, "--freeze-epochs", "0", "--augment", "heavy", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_second_train_on_the_same_out_stops_with_one_line(binary_folder, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom visiontune.locking import locked_dir\n"
         "with locked_dir(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(300)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("train", binary_folder, *TINY_FLAGS, "--out", tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"in use by another visiontune process (pid {holder.pid}" in result.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".visiontune.lock"]
