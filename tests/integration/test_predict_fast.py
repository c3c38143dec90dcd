"""Fast inference on a tiny trained run: ONNX fp32 equals torch, int8 agrees, plan changes are
invisible in the predictions, exported files are cached, and bad options are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from tests.unit.test_lazy_imports import INVOKE, python
from visiontune.cli.main import main
from visiontune.data.images import load_rgb
from visiontune.inference.engine import (
    InferencePlan,
    iter_logits,
    load_for_inference,
    plan_inference,
)
from visiontune.inference.openvino import OpenVinoModel

needs_onnx = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="the ONNX backend needs onnx and onnxruntime (pip install 'visiontune[onnx]')",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    data = write_class_folders(root / "data", {"blue": 12, "red": 12})
    return visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 3, "lr": 1e-2}), data


def logits_with(run, paths, **options) -> np.ndarray:
    options.setdefault("backend", None if "quantize" in options else "torch")
    plan = options.pop("plan", None) or plan_inference("cpu", threads=1, workers=0, **options)
    model, plan = load_for_inference(run, plan)
    batches = iter_logits(model, run.preprocessing.eval_transform(), paths, plan=plan)
    return np.concatenate([b.logits for b in batches])


def image_paths(data) -> list[str]:
    return sorted(str(p) for p in data.rglob("*.png"))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_channels_last_and_batch_size_do_not_change_predictions(tiny_run):
    run, data = tiny_run
    paths = image_paths(data)
    base = {"device": "cpu", "precision": "fp32", "backend": "torch", "quantize": None, "threads": 1, "workers": 0}
    nchw_single = logits_with(run, paths, plan=InferencePlan(batch_size=1, channels_last=False, **base))
    channels_last_batched = logits_with(run, paths, plan=InferencePlan(batch_size=7, channels_last=True, **base))
    np.testing.assert_allclose(channels_last_batched, nchw_single, atol=1e-4)


def test_bf16_probabilities_stay_close(tiny_run):
    run, data = tiny_run
    paths = image_paths(data)
    fp32, bf16 = logits_with(run, paths), logits_with(run, paths, precision="bf16")
    assert np.abs(softmax(bf16) - softmax(fp32)).max() < 0.05


@needs_onnx
def test_onnx_fp32_equals_torch_and_int8_agrees_on_argmax(tiny_run):
    run, data = tiny_run
    paths = image_paths(data)
    torch_logits = logits_with(run, paths)
    onnx_logits = logits_with(run, paths, backend="onnx")
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    int8_logits = logits_with(run, paths, quantize="int8")
    assert (int8_logits.argmax(axis=1) == torch_logits.argmax(axis=1)).all()
    assert not np.allclose(int8_logits, torch_logits, atol=1e-6)  # it really is the quantized model


OPENVINO_MODELS_FREED_OUT_OF_ORDER = """
import gc, signal, subprocess, sys
import numpy as np, openvino, openvino.opset13 as ops
from visiontune.inference.openvino import OpenVinoModel
images = ops.parameter([1, 4], np.float32, name="images")
openvino.save_model(openvino.Model([ops.relu(images)], [images]), sys.argv[1])
signal.signal(signal.SIGCHLD, lambda *_: None)  # torch's DataLoader installs one: signals then use the alternate stack
first, second = OpenVinoModel(sys.argv[1]), OpenVinoModel(sys.argv[1])
del first; gc.collect(); del second; gc.collect()
for _ in range(3):
    subprocess.run(["true"], check=True)
print("survived")
"""


def test_openvino_models_freed_in_any_order_leave_the_process_its_signal_stack(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack while it lives; with a
    plugin per model, freeing models first-in-first-out left a freed stack installed and the next
    SIGCHLD (a subprocess ending) killed the process. One shared Core keeps one plugin."""
    pytest.importorskip("openvino")
    done = subprocess.run([sys.executable, "-c", OPENVINO_MODELS_FREED_OUT_OF_ORDER, str(tmp_path / "relu.xml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "survived", (done.returncode, done.stderr[-2000:])


@needs_onnx
def test_openvino_fp32_equals_torch_and_bf16_stays_close(tiny_run):
    pytest.importorskip("openvino")
    run, data = tiny_run
    paths = image_paths(data)
    torch_logits = logits_with(run, paths)
    plan = plan_inference("cpu", backend="openvino", threads=1, workers=0)
    model, _ = load_for_inference(run, plan)
    assert isinstance(model, OpenVinoModel)
    np.testing.assert_allclose(logits_with(run, paths, plan=plan), torch_logits, atol=1e-4)
    bf16 = logits_with(run, paths, backend="openvino", precision="bf16")
    assert np.abs(softmax(bf16) - softmax(torch_logits)).max() < 0.05
    images = torch.stack([run.preprocessing.eval_transform()(load_rgb(p, run.config.max_pixels)) for p in paths[:3]])
    logits, features = model.logits_and_features(images)  # the graph's second output, for OOD scores
    assert logits.shape == (3, 2) and features.ndim == 2 and len(features) == 3


@needs_onnx
def test_openvino_normalises_uint8_batches_in_its_graph_and_predict_feeds_it_uint8(tiny_run):
    pytest.importorskip("openvino")
    run, data = tiny_run
    paths = image_paths(data)
    preprocessing = run.preprocessing
    plan = plan_inference("cpu", backend="openvino", threads=1, workers=0)
    model, _ = load_for_inference(run, plan)
    assert model.takes_uint8
    decoded = [load_rgb(p, run.config.max_pixels) for p in paths[:4]]
    as_float = torch.stack([preprocessing.eval_transform()(image) for image in decoded])
    as_uint8 = torch.stack([preprocessing.eval_transform(normalize=False)(image) for image in decoded])
    assert as_uint8.dtype == torch.uint8
    np.testing.assert_allclose(model(as_uint8).numpy(), model(as_float).numpy(), atol=1e-4)

    seen = []
    run_graph = model._run
    model._run = lambda images: seen.append(images.dtype) or run_graph(images)
    batches = iter_logits(model, preprocessing.eval_transform(), paths, plan=plan, preprocessing=preprocessing)
    logits = np.concatenate([b.logits for b in batches])
    assert set(seen) == {torch.uint8}
    np.testing.assert_allclose(logits, logits_with(run, paths), atol=1e-4)  # torch on float batches
    with pytest.raises(ValueError, match="float batches only"):
        OpenVinoModel(model.path, threads=1)(as_uint8)


@needs_onnx
def test_export_is_cached_until_the_checkpoint_changes(tiny_run):
    from visiontune.inference.onnx import export_run

    run, _ = tiny_run
    first = export_run(run)
    assert first == run.dir / "export" / "model.onnx" and first.with_name("model.onnx.json").is_file()
    written = first.stat().st_mtime_ns
    assert export_run(run).stat().st_mtime_ns == written  # cached
    checkpoint = run.checkpoint_path("best")
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    assert export_run(run).stat().st_mtime_ns != written  # re-exported
    assert not list((run.dir / "export").glob(".*.tmp"))


@needs_onnx
def test_predict_api_with_onnx_backend_gives_the_same_labels(tiny_run):
    run, data = tiny_run
    torch_rows = run.predict(str(data), workers=0, backend="torch").rows
    onnx_rows = run.predict(str(data), workers=0).rows  # onnx: the CPU default where installed
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(onnx_rows, torch_rows)) < 1e-4


def test_automatic_backend_falls_back_to_torch_when_export_fails(tiny_run, monkeypatch, caplog):
    import visiontune.inference.engine as engine

    run, data = tiny_run

    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(engine, "export_run", broken_export)
    plan = plan_inference("cpu", backend="onnx", threads=1, workers=0)
    model, used = load_for_inference(run, plan, fallback=True)
    assert isinstance(model, torch.nn.Module) and used.backend == "torch" and used.channels_last
    assert "unsupported operator" in caplog.text
    with pytest.raises(RuntimeError):
        load_for_inference(run, plan)  # asked for explicitly: the error stands
    assert len(run.predict(str(data), workers=0).rows) == len(image_paths(data))


@needs_onnx
def test_an_export_openvino_cannot_compile_runs_in_onnx_runtime_when_chosen_automatically(tiny_run, monkeypatch,
                                                                                          caplog):
    import visiontune.inference.engine as engine

    run, _ = tiny_run

    def broken_compile(*args, **kwargs):
        raise RuntimeError("Unsupported operation")

    monkeypatch.setattr(engine, "OpenVinoModel", broken_compile)
    plan = plan_inference("cpu", backend="openvino", threads=1, workers=0)
    model, used = load_for_inference(run, plan, fallback=True)
    assert type(model).__name__ == "OnnxModel" and used.backend == "onnx"
    assert "OpenVINO could not compile" in caplog.text and "Unsupported operation" in caplog.text
    with pytest.raises(RuntimeError):
        load_for_inference(run, plan)  # asked for explicitly: the error stands
    bf16 = plan_inference("cpu", backend="openvino", precision="bf16", threads=1, workers=0)
    model, used = load_for_inference(run, bf16, fallback=True)  # ONNX Runtime has no bf16: torch autocast
    assert isinstance(model, torch.nn.Module) and (used.backend, used.precision) == ("torch", "bf16")


def run_cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["visiontune", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.mark.parametrize(("args", "message"), [
    (("--backend", "tensorflow"), "--backend must be one of torch, onnx, openvino"),
    (("--precision", "fp16"), "--precision must be one of fp32, bf16"),
    (("--quantize", "int4"), "--quantize must be int8"),
])
def test_predict_option_errors_exit_2_with_one_line(tiny_run, tmp_path, monkeypatch, capsys, args, message):
    run, data = tiny_run
    assert run_cli(monkeypatch, "predict", run.dir, data, "--out", tmp_path / "p.csv", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_run_dir_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, "export", tmp_path / "missing") == 2
    err = capsys.readouterr().err.strip()
    assert "not a visiontune run directory" in err and len(err.splitlines()) == 1


def _nothing_to_read(tmp_path, case: str) -> list[str]:
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return [tmp_path / "empty"]
    if case == "folder named x.jpg":
        (tmp_path / "x.jpg").mkdir()
        return [tmp_path / "x.jpg"]
    if case == "missing file":
        return [tmp_path / "missing.png"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")  # only unreadable files
    return [tmp_path / "broken.png"]


@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("case", ["empty folder", "folder named x.jpg", "missing file", "unreadable only"])
def test_every_image_command_exits_2_when_it_read_nothing(tiny_run, tmp_path, monkeypatch, capsys, command, case):
    run, _ = tiny_run
    paths = _nothing_to_read(tmp_path, case)
    extra = ["--out", tmp_path / ("p.csv" if command == "predict" else "overlays")]
    assert run_cli(monkeypatch, command, run.dir, *paths, *extra, *(["--workers", "0"] if command == "predict" else [])) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = {"missing file": "no such file or folder", "unreadable only": "none of the 1 image file(s) could be read"}
    assert expected.get(case, "no image files found") in err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predict_that_read_nothing_leaves_the_out_file_as_it_was(tiny_run, tmp_path, monkeypatch, capsys, suffix):
    run, _ = tiny_run
    broken = _nothing_to_read(tmp_path, "unreadable only")
    earlier, fresh = tmp_path / f"earlier{suffix}", tmp_path / f"fresh{suffix}"
    earlier.write_text("an earlier run's predictions\n")
    for out in (earlier, fresh):
        assert run_cli(monkeypatch, "predict", run.dir, *broken, "--out", out, "--workers", "0") == 2
        listed = out.with_name(out.stem + ".skipped.csv").read_text()
        assert "broken.png" in listed and "not a readable image" in listed
    assert earlier.read_text() == "an earlier run's predictions\n"
    assert not fresh.exists()
    captured = capsys.readouterr()
    assert "written to" not in captured.out and "none of the 1 image file(s) could be read" in captured.err


@pytest.mark.slow
def test_cli_predict_loads_none_of_evaluate_and_explain_libraries(tiny_run, tmp_path):
    """`predict` is the command run on a few images at a time: start-up is most of its wall time,
    and evaluate's / explain's libraries (matplotlib, grad-cam) cost about a second of it."""
    run, data = tiny_run
    out = tmp_path / "p.csv"
    result = python("-c", INVOKE, "predict", str(run.dir), str(data / "red"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["exit_code"] == 0, answer["output"]
    assert len(out.read_text().splitlines()) == 1 + 12
    assert not {"matplotlib", "pytorch_grad_cam", "visiontune.evaluation.evaluate"} & set(answer["modules"])
