"""A Triton Inference Server model repository around the checked ONNX file.

Layout (Triton's): OUT/<name>/config.pbtxt, OUT/<name>/labels.txt, OUT/<name>/1/model.onnx, plus
OUT/README.md. Triton runs the network only: decoding and preprocessing happen in the client, and
the model answers logits (and the penultimate `features`), so the README spells out the run's preprocessing, temperature and
decision threshold with their values, as `visiontune predict` applies them.
"""

from __future__ import annotations

import re
from pathlib import Path

from visiontune.errors import UserError
from visiontune.export.check import copy_checked
from visiontune.inference.onnx import FEATURES, INPUT, OUTPUT
from visiontune.io import write_text_atomic
from visiontune.models.classifier_run import ClassifierRun

MAX_BATCH_SIZE = 32
PREFERRED_BATCH_SIZES = (8, 16)
MAX_QUEUE_DELAY_US = 1000  # 1 ms: little next to a CNN's forward pass on a CPU, enough to gather requests
NAME = re.compile(r"[A-Za-z0-9_-]+")


def model_name(run: ClassifierRun, name: str | None) -> str:
    """`name` checked, or the run directory's name with anything but letters, digits, _ and - made _."""
    if name is not None:
        if not NAME.fullmatch(name):
            raise UserError(f"--name {name!r} is not a Triton model name: use letters, digits, _ and -")
        return name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", run.dir.resolve().name).strip("_-") or "model"


def write_repository(run: ClassifierRun, onnx_file: Path, check: dict, out: Path, name: str | None) -> Path:
    """OUT/<name>/ for the checked `onnx_file`; returns that model directory."""
    name = model_name(run, name)
    model_dir = out / name
    copy_checked(onnx_file, model_dir / "1" / "model.onnx", check)
    write_text_atomic(model_dir / "labels.txt", "".join(f"{label}\n" for label in run.labels))
    config = config_text(name, run.preprocessing.input_size, len(run.labels), feature_size(onnx_file))
    write_text_atomic(model_dir / "config.pbtxt", config)
    write_text_atomic(out / "README.md", readme(run, name, out))
    return model_dir


def feature_size(onnx_file: Path) -> int:
    """The width of the graph's `features` output (the run's penultimate layer)."""
    import onnx  # an optional dependency, present whenever an ONNX file was exported

    outputs = {output.name: output for output in onnx.load(str(onnx_file), load_external_data=False).graph.output}
    return outputs[FEATURES].type.tensor_type.shape.dim[1].dim_value


def config_text(name: str, image_size: int, classes: int, features: int) -> str:
    """Triton's ModelConfig in protobuf text format; dims leave out the batch axis (max_batch_size > 0)."""
    preferred = ", ".join(map(str, PREFERRED_BATCH_SIZES))
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_FP32
    dims: [ 3, {image_size}, {image_size} ]
  }}
]
output [
  {{
    name: "{OUTPUT}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
    label_filename: "labels.txt"
  }},
  {{
    name: "{FEATURES}"
    data_type: TYPE_FP32
    dims: [ {features} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""


def readme(run: ClassifierRun, name: str, out: Path) -> str:
    """What the client must do around the served network, with this run's values."""
    p = run.preprocessing
    size, resize = p.input_size, p.resize_size
    resized = (f"resize the whole image to {resize}x{resize}" if p.crop_mode == "squash"
               else f"resize the shorter side to {resize} px")
    activation = ("softmax(logits / T)" if run.metadata.get("loss", "ce") == "ce"
                  else "sigmoid(logits / T), divided by their sum (the run was trained with a sigmoid loss)")
    temperature = run.temperature
    lines = [
        f"# Triton model repository: `{name}`",
        "",
        f"Written by `visiontune export {run.dir} --format triton` from the run's best checkpoint. Serve it with",
        "",
        f"    tritonserver --model-repository {out.resolve()}",
        "",
        f"`{name}` runs ONNX Runtime on CPU instances, with dynamic batching of up to {MAX_BATCH_SIZE} images",
        "(for GPU instances, change `KIND_CPU` to `KIND_GPU` in config.pbtxt).",
        "",
        f"## Input `{INPUT}`: float32 [N, 3, {size}, {size}], preprocessed by the client",
        "",
        "1. Decode the image to RGB, applying its EXIF orientation.",
        f"2. {resized.capitalize()} ({p.interpolation}, antialiased), then centre-crop {size}x{size}.",
        (f"3. Scale to [0, 1], subtract mean {list(p.mean)} and divide by std {list(p.std)} per channel "
         "(RGB order), channels first."),
        "",
        f"## Output `{OUTPUT}`: float32 [N, {len(run.labels)}], classes in labels.txt order",
        "",
        "The model returns logits, not probabilities. As `visiontune predict` does, the client computes",
        "",
        f"- probabilities = {activation}, with T = {temperature:g}"
        + (" (fitted on validation by `evaluate --temperature`)" if temperature != 1 else " (no temperature fitted)"),
    ]
    threshold = run.threshold if len(run.labels) == 2 else None
    if threshold:
        other = next(label for label in run.labels if label != threshold["positive"])
        lines.append(f"- the label: `{threshold['positive']}` when its probability with T = 1 (the threshold was "
                     f"chosen on the uncalibrated probabilities) >= {threshold['threshold']:.6g}, else `{other}` "
                     f"(threshold.json, chosen on validation for recall >= {threshold.get('target_recall')})")
    else:
        lines.append("- the label: the class with the highest probability (no decision threshold saved)")
    lines += [
        "",
        f"## Output `{FEATURES}`: float32 [N, D], the penultimate features the logits are computed from",
        "",
        "What `visiontune predict` scores out-of-distribution inputs on (KNN distance to the run's training",
        "features, RUN/ood.json); request only `logits` when that is not needed.",
        "",
        "Triton's classification extension (`class_count` in a request) ranks the raw logits: the same order",
        "as the probabilities, but without the temperature and the threshold above.",
        "",
    ]
    return "\n".join(lines)
