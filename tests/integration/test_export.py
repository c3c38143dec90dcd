"""`visiontune export` of a tiny classifier run: each format's files, their check against eager
torch, the Triton repository's config, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.cli.main import main
from visiontune.errors import UserError
from visiontune.export.check import TOLERANCE, check_export, check_inputs
from visiontune.export.classifier import load_torchscript
from visiontune.export.triton import model_name

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_class_folders(root / "data", {"blue": 12, "red": 12})
    return visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 3, "lr": 1e-2})


def run_cli(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["visiontune", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def val_images(run) -> torch.Tensor:
    images, source = check_inputs(run)
    assert source == "val images"
    return images


def read_check(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".check.json").read_text())


@pytest.mark.parametrize(("format", "file"), [("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt")])
def test_each_format_is_written_cached_and_checked(tiny_run, monkeypatch, capsys, format, file):
    assert run_cli(monkeypatch, "export", tiny_run.dir, "--format", format) == 0
    path = tiny_run.dir / "export" / file
    check = read_check(path)
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
    assert check["images"] == len(val_images(tiny_run)) and check["reference"] == "torch eager fp32"
    out = capsys.readouterr().out
    assert f"written: {path}" in out and f"max |logit difference| {check['max_abs_diff']:.3g}" in out
    assert path.with_name(file + ".json").is_file()  # the checkpoint key: exported once
    written = path.stat().st_mtime_ns
    assert run_cli(monkeypatch, "export", tiny_run.dir, "--format", format) == 0
    assert path.stat().st_mtime_ns == written


def test_torchscript_loads_with_torch_jit_and_gives_the_same_logits(tiny_run, monkeypatch):
    assert run_cli(monkeypatch, "export", tiny_run.dir, "--format", "torchscript") == 0
    images = val_images(tiny_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        scripted = torch.jit.load(str(tiny_run.dir / "export" / "model.torchscript.pt"))
    with torch.inference_mode():
        expected = tiny_run.load_model("best")(images)
        np.testing.assert_allclose(scripted(images).numpy(), expected.numpy(), atol=1e-5)
        batch_of_one = load_torchscript(tiny_run.dir / "export" / "model.torchscript.pt")(images[:1])
    np.testing.assert_allclose(batch_of_one.numpy(), expected[:1].numpy(), atol=1e-5)


def test_int8_reports_argmax_agreement_instead_of_failing(tiny_run, monkeypatch):
    assert run_cli(monkeypatch, "export", tiny_run.dir, "--quantize", "int8") == 0
    check = read_check(tiny_run.dir / "export" / "model.int8.onnx")
    assert check["tolerance"] is None and check["argmax_agreement"] == 1.0 and check["max_abs_diff"] > 0


def test_out_copies_the_checked_file(tiny_run, monkeypatch, tmp_path):
    assert run_cli(monkeypatch, "export", tiny_run.dir, "--out", tmp_path) == 0
    copy = tmp_path / "model.onnx"
    assert copy.read_bytes() == (tiny_run.dir / "export" / "model.onnx").read_bytes()
    assert read_check(copy) == read_check(tiny_run.dir / "export" / "model.onnx")


def test_triton_repository_has_the_expected_config_labels_and_readme(tiny_run, monkeypatch, capsys, tmp_path):
    repository = tmp_path / "models"
    assert run_cli(monkeypatch, "export", tiny_run.dir, "--format", "triton", "--out", repository,
                   "--name", "colours-v1") == 0
    model_dir = repository / "colours-v1"
    assert (model_dir / "1" / "model.onnx").read_bytes() == (tiny_run.dir / "export" / "model.onnx").read_bytes()
    assert read_check(model_dir / "1" / "model.onnx")["max_abs_diff"] < 1e-4
    assert (model_dir / "labels.txt").read_text().splitlines() == tiny_run.labels == ["blue", "red"]
    config = (model_dir / "config.pbtxt").read_text()
    fields = dict(re.findall(r"^(name|platform|max_batch_size): \"?([^\"\n]*)\"?$", config, re.MULTILINE))
    assert fields == {"name": "colours-v1", "platform": "onnxruntime_onnx", "max_batch_size": "32"}
    tensors = re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([\d, ]+) \]', config)
    assert tensors == [("images", "TYPE_FP32", "3, 32, 32"), ("logits", "TYPE_FP32", "2"), ("features", "TYPE_FP32", "96")]
    assert 'label_filename: "labels.txt"' in config and "kind: KIND_CPU" in config
    assert re.search(r"dynamic_batching \{\s+preferred_batch_size: \[ 8, 16 \]\s+max_queue_delay_microseconds: 1000",
                     config)
    readme = (repository / "README.md").read_text()
    p = tiny_run.preprocessing
    assert f"tritonserver --model-repository {repository.resolve()}" in readme
    assert f"centre-crop {p.input_size}x{p.input_size}" in readme and str(list(p.mean)) in readme
    assert "softmax(logits / T), with T = 1 (no temperature fitted)" in readme
    assert f"tritonserver --model-repository {repository.resolve()}" in capsys.readouterr().out


def test_triton_names_come_from_the_run_folder():
    assert model_name(SimpleNamespace(dir=Path("/x/my run.v2")), None) == "my_run_v2"
    assert model_name(SimpleNamespace(dir=Path("/x/...")), None) == "model"
    with pytest.raises(UserError, match="use letters, digits, _ and -"):
        model_name(SimpleNamespace(dir=Path("/x/run")), "a/b")


def test_a_check_beyond_the_tolerance_is_refused_with_the_numbers(tiny_run, tmp_path):
    model = tiny_run.load_model("best")
    exported = tmp_path / "broken.onnx"
    with pytest.raises(UserError, match=r"max \|logit difference\| 0\.01 > 0\.001 on \d+ val images"):
        check_export(tiny_run, exported, lambda images: model(images) + 0.01)
    assert TOLERANCE < read_check(exported)["max_abs_diff"] == pytest.approx(0.01, abs=1e-6)


def test_a_run_without_its_images_is_checked_on_seeded_noise(tiny_run, tmp_path):
    copy = Path(shutil.copytree(tiny_run.dir, tmp_path / "copy"))
    (copy / "splits.csv").unlink()
    images, source = check_inputs(visiontune.load_run(copy))
    assert source.startswith("random inputs") and images.shape == (4, 3, 32, 32)


@pytest.mark.parametrize(("args", "message"), [
    (("--format", "onnxx"), "--format must be one of onnx, torchscript, triton, not 'onnxx'; did you mean onnx?"),
    (("--format", "torchscript", "--quantize", "int8"), "use it with --format onnx or triton"),
    (("--quantize", "int4"), "--quantize must be int8"),
    (("--name", "m"), "--name names the model in a Triton repository: use it with --format triton"),
    (("--format", "triton", "--name", "a b"), "--name 'a b' is not a Triton model name"),
])
def test_bad_options_exit_2_with_one_line(tiny_run, monkeypatch, capsys, args, message):
    assert run_cli(monkeypatch, "export", tiny_run.dir, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_folder_that_is_no_run_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, "export", tmp_path, "--format", "torchscript") == 2
    err = capsys.readouterr().err.strip()
    assert "is not a visiontune run directory" in err and len(err.splitlines()) == 1
