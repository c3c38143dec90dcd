"""`visiontune benchmark` on a tiny timm model: every column measured, the plan shown, user errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from visiontune.bench.benchmark import COLUMNS, benchmark, machine, synthetic_photos
from visiontune.cli.main import main
from visiontune.data import dataset
from visiontune.data.transforms import Preprocessing
from visiontune.inference.engine import onnx_available, openvino_available
from visiontune.inference.openvino import OpenVinoModel
from visiontune.models.backbones import create_classifier

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


def test_end_to_end_takes_predicts_path_draft_decoded_uint8_batches(monkeypatch):
    """The e2e row times what `predict` runs: JPEGs draft-decoded to the resize target, and uint8
    batches into an OpenVINO model that normalises them itself (float batches before)."""
    if not openvino_available():
        pytest.skip("needs OpenVINO (pip install 'visiontune[openvino]')")

    dtypes, drafts = [], []
    call, files = OpenVinoModel.__call__, dataset.ImageFiles.__init__

    def recording_call(self, images):
        dtypes.append(images.dtype)
        return call(self, images)

    def recording_files(self, *args, draft_size=None, **kwargs):
        drafts.append(draft_size)
        files(self, *args, draft_size=draft_size, **kwargs)

    monkeypatch.setattr(OpenVinoModel, "__call__", recording_call)
    monkeypatch.setattr(dataset.ImageFiles, "__init__", recording_files)
    result = benchmark(TINY, batch_sizes=(4,), repeats=1, warmup=0, backend="openvino", threads=1, workers=0)
    assert result["rows"][0]["e2e_images_per_s"] > 0
    assert dtypes[0] == torch.float32  # the model-only row: a ready float tensor
    assert set(dtypes[1:]) == {torch.uint8} and len(dtypes) > 8  # every e2e batch
    assert drafts == [Preprocessing.from_model(create_classifier(TINY, 2, pretrained=False)).resize_size]


def test_machine_names_the_cpu_generation_and_its_vector_flags(tmp_path):
    """A VM's "AMD EPYC" hides whether timings came from one CPU generation or another."""
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: fpu {}\n\n"
    cpuinfo.write_text(block.format(0, "avx2 avx512f avx512_bf16 sse2") + block.format(1, "amx_int8"))
    found = machine(str(cpuinfo))
    assert (found["cpu"], found["cpu_family_model"]) == ("AMD EPYC", "26/2")
    assert found["cpu_flags"] == ["avx2", "avx512_bf16", "avx512f"]  # the first processor's, speed flags only
    missing = machine(str(tmp_path / "none"))
    assert missing["cpu_family_model"] is None and missing["cpu_flags"] == [] and missing["cpu"]


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
