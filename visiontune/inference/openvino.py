"""OpenVINO inference of a run's exported ONNX graph on a CPU, fp32 or bf16.

The graph is the one `onnx.export_run` writes and checks (RUN/export/model.onnx); OpenVINO
compiles it for this CPU. On the project's 2-core AMD EPYC (AVX-512 with AVX512_BF16) it ran lite0
1.2-1.3x faster than ONNX Runtime in fp32 and 1.9-2.9x in bf16, model only, and `predict` 1.4-1.6x
faster end to end in fp32 (docs/benchmarks.md, "Issue 19: OpenVINO"). bf16 is OpenVINO's
inference precision hint: weights and activations in bfloat16 on CPUs with native bf16
instructions, fp32 accumulation.

Given the run's normalisation, the model also takes uint8 batches (the `normalize=False`
transforms) and normalises them inside the compiled graph (OpenVINO's preprocessing API, part of
what its plugin optimises): a quarter of the bytes from the decoding worker and no per-image float pass
there, which made `predict` 1.02-1.09x faster end to end in fp32 (docs/benchmarks.md, "uint8
batches"). The exported ONNX file keeps its float interface for every other client.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from visiontune.errors import UserError
from visiontune.inference.onnx import FEATURES, INPUT, OUTPUT, input_array

Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std) of 0-1 pixel values, per channel

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def require_openvino() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise UserError("the OpenVINO backend needs openvino: pip install 'visiontune[openvino]'") from None


_core_lock = threading.Lock()


def shared_core():
    """One OpenVINO Core, so one CPU plugin, for the whole process. The plugin swaps in its own
    alternate signal stack when it is created and puts the previous one back when it is freed; with
    a Core per model, models freed in another order than they were loaded left a freed stack
    installed, and the next signal handled on it (SIGCHLD as a subprocess ends, once torch's
    DataLoader has set a handler) killed the process without a traceback."""
    with _core_lock:  # functools.cache alone lets two threads loading at once each make a Core
        return _new_core()


@functools.cache
def _new_core():
    import openvino

    return openvino.Core()


class OpenVinoModel:
    """Callable like `onnx.OnnxModel`: a float NCHW CPU tensor in, logits out, and
    `logits_and_features` from a run's graph. One infer request, used by one caller at a time (an
    OpenVINO request is not thread-safe; ONNX Runtime's session is).

    With `normalization`, uint8 NCHW batches (0-255) are taken too (`takes_uint8`), through a
    second compilation of the graph, made on the first such batch, that normalises them itself.
    """

    def __init__(self, path: str | Path, threads: int = 1, precision: str = "fp32",
                 normalization: Normalization | None = None) -> None:
        require_openvino()
        if precision not in PRECISION_HINTS:
            raise UserError(f"--precision must be one of {', '.join(PRECISION_HINTS)}, not {precision!r}")
        self.path, self.normalization = Path(path), normalization
        self._config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
                        "PERFORMANCE_HINT": "LATENCY"}  # one request at a time, all threads on it
        self.compiled = shared_core().compile_model(str(path), "CPU", self._config)
        self.request = self.compiled.create_infer_request()
        self._uint8_request = None
        self._lock = threading.Lock()

    @property
    def takes_uint8(self) -> bool:
        return self.normalization is not None

    def _request_for(self, images: torch.Tensor):
        if images.dtype != torch.uint8:
            return self.request
        if self.normalization is None:
            raise ValueError("this OpenVinoModel was made without a normalization, so it takes float batches only")
        if self._uint8_request is None:
            self._uint8_request = self._compile_uint8().create_infer_request()
        return self._uint8_request

    def _compile_uint8(self):
        """The graph behind a preprocessing step: uint8 -> float, (x - 255 mean) / (255 std)."""
        from openvino import Layout, Type
        from openvino.preprocess import PrePostProcessor

        mean, std = self.normalization
        steps = PrePostProcessor(shared_core().read_model(str(self.path)))
        graph_input = steps.input(INPUT)
        graph_input.tensor().set_element_type(Type.u8).set_layout(Layout("NCHW"))
        graph_input.model().set_layout(Layout("NCHW"))
        graph_input.preprocess().convert_element_type(Type.f32).mean([255 * m for m in mean]).scale(
            [255 * s for s in std])
        return shared_core().compile_model(steps.build(), "CPU", self._config)

    def _run(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        with self._lock:
            request = self._request_for(images)
            results = request.infer({INPUT: input_array(images)})
            return {port.get_any_name(): value.copy() for port, value in results.items()}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run(images)[OUTPUT])

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self._run(images)
        return torch.from_numpy(outputs[OUTPUT]), torch.from_numpy(outputs[FEATURES])
