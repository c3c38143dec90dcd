"""`visiontune benchmark` on a tiny timm model: every column measured, the plan shown, user errors."""

from __future__ import annotations

import json
import sys

import pytest

from visiontune.bench.benchmark import COLUMNS, benchmark, synthetic_photos
from visiontune.cli.main import main
from visiontune.inference.engine import onnx_available, openvino_available

TINY = "test_resnet"


def run_cli(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["visiontune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_json_has_every_column_positive_for_two_batch_sizes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    code = run_cli(monkeypatch, "benchmark", TINY, "--batch-sizes", "1,4", "--repeats", "1", "--threads", "1",
                   "--workers", "0", "--train", "--json", str(out))
    assert code in (0, None)
    result = json.loads(out.read_text())
    assert [(r["mode"], r["batch_size"]) for r in result["rows"]] == [("infer", 1), ("infer", 4), ("train", 1), ("train", 4)]
    for row in result["rows"]:
        assert set(COLUMNS) <= set(row)
        assert row["device"] == "cpu" and row["cuda_max_allocated_mb"] is None
        measured = ("images_per_s", "ms_per_image", "peak_rss_mb") + (
            ("e2e_images_per_s", "e2e_ms_per_image") if row["mode"] == "infer" else ())
        for column in measured:
            assert row[column] > 0, column
        assert row["ms_per_image"] == pytest.approx(1000 / row["images_per_s"])
    plan = result["plans"]["cpu"]
    backend = "openvino" if openvino_available() else "onnx" if onnx_available() else "torch"
    assert (plan["backend"], plan["precision"], plan["threads"], plan["workers"]) == (backend, "fp32", 1, 0)
    assert f"plan cpu: {backend} fp32, batch 8" in capsys.readouterr().out


def test_onnx_int8_backend_on_a_model_name(tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX backend needs onnxruntime (pip install 'visiontune[onnx]')")
    result = benchmark(TINY, batch_sizes=(2,), repeats=1, warmup=0, quantize="int8", threads=1, workers=0)
    (row,) = result["rows"]
    assert result["plans"]["cpu"]["backend"] == "onnx" and result["plans"]["cpu"]["quantize"] == "int8"
    assert row["images_per_s"] > 0 and row["e2e_images_per_s"] > 0


def test_synthetic_photos_are_realistic_jpegs(tmp_path):
    from PIL import Image

    paths = synthetic_photos(tmp_path, count=2)
    with Image.open(paths[0]) as image:
        assert image.format == "JPEG" and image.size == (500, 375)


@pytest.mark.parametrize(("args", "message"), [
    (("benchmark", "/no/such/run"), "not a run directory"),
    (("benchmark", "no_such_model_xyz"), "unknown model"),
    (("benchmark", TINY, "--batch-sizes", "1,x"), "comma-separated"),
    (("benchmark", TINY, "--backend", "tensorflow"), "--backend must be one of"),
])
def test_user_errors_exit_2_with_one_line(monkeypatch, capsys, args, message):
    assert run_cli(monkeypatch, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_data_that_does_not_decode_is_a_user_error_not_a_rate(tmp_path, monkeypatch, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "corrupt.jpg").write_bytes(b"not a jpeg")
    code = run_cli(monkeypatch, "benchmark", TINY, "--data", str(data), "--batch-sizes", "1", "--repeats", "1",
                   "--threads", "1", "--workers", "0")
    assert code == 2
    message = capsys.readouterr().err
    assert "do not decode" in message and "corrupt.jpg" in message and "Traceback" not in message
