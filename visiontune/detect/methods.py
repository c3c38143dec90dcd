"""The two detection methods behind one name each: "faster-rcnn" (this package's faster_rcnn) and
"rcnn" (the region pipeline of rcnn). model.json's `method` says which one reads a run back, and its
options sit under their own key (`faster_rcnn` or `rcnn`), dumped from the method's options model."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from visiontune.detect import faster_rcnn, rcnn
from visiontune.detect.types import Detector, ImageTargets
from visiontune.errors import UserError

METHODS = ("faster-rcnn", "rcnn")
OPTIONS_KEY = {"faster-rcnn": "faster_rcnn", "rcnn": "rcnn"}


def check_method(method: str, options: BaseModel | None) -> BaseModel:
    """The method's options (Faster R-CNN's defaults when none), checked before any data is read."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "faster-rcnn":
        options = options if options is not None else faster_rcnn.FasterRCNNOptions()
        faster_rcnn.check_options(options)
        return options
    if options is None:
        raise UserError("--method rcnn needs a region classifier: --classifier RUN (a visiontune classifier run)")
    return options


def fit_method(method: str, train: list[ImageTargets], val: list[ImageTargets], classes: list[str], out: Path,
               options: BaseModel) -> Detector:
    if method == "faster-rcnn":
        return faster_rcnn.fit_faster_rcnn(train, val, classes, out, options)
    return rcnn.fit_rcnn(train, val, classes, out, options)


def load_detector(run_dir: Path, meta: dict) -> Detector:
    method = meta.get("method")
    if method == "faster-rcnn":
        return faster_rcnn.load_faster_rcnn(run_dir, meta)
    if method == "rcnn":
        return rcnn.load_rcnn(run_dir, meta)
    raise UserError(f"{run_dir}/model.json is damaged: unknown detection method {method!r}")
