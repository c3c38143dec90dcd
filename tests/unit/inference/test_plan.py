"""The inference plan chosen per device, and the option combinations it refuses."""

from __future__ import annotations

import pytest
import torch

from visiontune.errors import UserError
from visiontune.inference import engine as inference
from visiontune.inference.engine import CPU_BATCH, CUDA_BATCH, plan_inference


def test_cpu_plan_is_small_channels_last_fp32_batches():
    plan = plan_inference("cpu", backend="torch", threads=2, workers=1)
    assert (plan.batch_size, plan.channels_last, plan.precision, plan.backend) == (CPU_BATCH, True, "fp32", "torch")
    assert (plan.threads, plan.workers) == (2, 1)
    assert "channels_last" in plan.describe() and "2 thread(s)" in plan.describe()


@pytest.mark.parametrize(("onnx", "openvino", "expected"), [
    (True, True, "openvino"), (True, False, "onnx"), (False, False, "torch"),
])
def test_cpu_backend_is_openvino_then_onnx_where_installed_else_torch(monkeypatch, onnx, openvino, expected):
    monkeypatch.setattr(inference, "onnx_available", lambda: onnx)
    monkeypatch.setattr(inference, "openvino_available", lambda: openvino)
    plan = plan_inference("cpu", threads=1, workers=0)
    assert (plan.backend, plan.channels_last, plan.precision) == (expected, expected == "torch", "fp32")
    bf16 = plan_inference("cpu", precision="bf16", threads=1, workers=0)  # ONNX Runtime has no bf16 path
    assert bf16.backend == ("openvino" if openvino else "torch")
    assert plan_inference(torch.device("cuda"), workers=0).backend == "torch"


def test_cuda_plan_is_large_bf16_batches():  # planning only: no GPU needed
    plan = plan_inference(torch.device("cuda"), workers=2)
    assert (plan.device, plan.batch_size, plan.channels_last, plan.precision) == ("cuda", CUDA_BATCH, True, "bf16")


def test_quantize_implies_onnx_without_channels_last():
    plan = plan_inference("cpu", quantize="int8", threads=1, workers=0)
    assert (plan.backend, plan.quantize, plan.channels_last) == ("onnx", "int8", False)
    assert plan.describe().startswith("cpu: onnx int8")


def test_explicit_options_are_kept():
    plan = plan_inference("cpu", batch_size=3, precision="bf16", threads=1, workers=0)
    assert (plan.batch_size, plan.precision) == (3, "bf16")


@pytest.mark.parametrize(("options", "message"), [
    ({"backend": "tensorflow"}, "--backend must be one of torch, onnx, openvino"),
    ({"precision": "fp8"}, "--precision must be one of fp32, bf16"),
    ({"quantize": "int4"}, "--quantize must be int8"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"backend": "onnx", "precision": "bf16"}, "bf16 applies to --backend torch or openvino"),
    ({"backend": "openvino", "quantize": "int8"}, "--quantize int8 runs in ONNX Runtime"),
])
def test_bad_combinations_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        plan_inference("cpu", threads=1, workers=0, **options)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_graph_backends_run_on_the_cpu_only(backend):
    with pytest.raises(UserError, match=f"--backend {backend} runs on the CPU"):
        plan_inference(torch.device("cuda"), backend=backend)
