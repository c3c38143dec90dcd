"""fit / load / predict / evaluate of anomaly models: the glue between files and the detectors."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from visiontune.anomaly.base import AnomalyModel, read_model_files
from visiontune.anomaly.calibration import folds_for
from visiontune.anomaly.components.anomaly_map import MapScoring, heatmap_overlay
from visiontune.anomaly.components.features import resolve_layers
from visiontune.anomaly.data import (
    GOOD,
    defect_images,
    good_images,
    labelled_images,
)
from visiontune.anomaly.detectors import DETECTORS
from visiontune.anomaly.evaluation import evaluate_model
from visiontune.anomaly.onnx_scoring import OnnxScorer, exported_graph
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.dataset import default_workers
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.paths import PathList, expand_image_paths
from visiontune.data.shards import Shard, run_shard
from visiontune.data.transforms import Preprocessing
from visiontune.devices import plan_cpu, resolve_device
from visiontune.errors import UserError, first_line
from visiontune.inference.engine import onnx_available
from visiontune.io import atomic_write, write_text_atomic
from visiontune.locking import locked_dir
from visiontune.models.backbones import check_weights_available
from visiontune.models.extractor import create_extractor
from visiontune.runformat import META_FILE

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
CSV_COLUMNS = ("path", "score", "decision", "threshold", "heatmap", "reason")


def fit(good: str | Path, *, method: str = "patchcore", backbone: str = "wide_resnet50_2",
        layers: Sequence[str] | None = None, image_size: int | None = None, coreset_ratio: float = 0.01,
        n_features: int | None = None, weights: str | Path | None = None, pretrained: bool = True,
        val_defects: str | Path | None = None, target_recall: float | None = None,
        holdout_fraction: float = 0.1, false_alarm_rate: float = 0.01,
        out: str | Path | None = None, batch_size: int = 16, workers: int | None = None,
        device: str = "auto", seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
        chunk_patches: int | None = None, calibration: str = "auto",
        scoring: MapScoring | None = None) -> AnomalyModel:
    """Fit `method` on the good images in `good` (a folder, or an MVTec AD category root).

    The threshold is the (1 - false_alarm_rate) quantile of good images' scores; with a folder of
    labelled `val_defects` (data.defect_images), the F1-optimal threshold over both, or, with a
    `target_recall`, the highest threshold that flags that share of them. The good scores are
    out-of-fold scores of all training images (`calibration="kfold"`, the "auto" choice below 100
    images) or those of `holdout_fraction` of them kept out of the fit ("holdout"). Saved to `out`
    when given. `scoring` (components/anomaly_map.MapScoring) sets the maps' blur and the image score.
    """
    if method not in DETECTORS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(DETECTORS)}")
    folds_for(calibration, 0)  # a misspelt choice stops before any work
    _check_options(coreset_ratio, holdout_fraction, false_alarm_rate, image_size, batch_size)
    _check_target_recall(target_recall, val_defects)
    check_weights_available(backbone, pretrained, weights)
    with ExitStack() as stack:
        if out is not None:
            stack.enter_context(locked_dir(out))  # one writer per directory, for the whole fit
            if (Path(out) / META_FILE).exists():
                raise UserError(f"{out} already holds a model; pass another --out or remove it")
        layers = resolve_layers(backbone, list(layers) if layers else None, DETECTORS[method].default_strides)
        files = good_images(good)
        defect_files = [image.path for image in defect_images(val_defects)] if val_defects is not None else []
        folds = folds_for(calibration, len(files))
        train, holdout = (files, []) if folds else split_holdout(files, holdout_fraction, seed)
        extractor = create_extractor(backbone, layers, pretrained, weights, seed)
        detector = DETECTORS[method].from_options(coreset_ratio=coreset_ratio, n_features=n_features,
                                                  chunk_patches=chunk_patches, seed=seed)
        model = AnomalyModel(extractor, detector, Preprocessing.from_model(extractor.model, image_size),
                             batch_size=batch_size, workers=_workers(workers, device), max_pixels=max_pixels,
                             device=device, scoring=scoring)
        model.fit(train, holdout, defect_files, false_alarm_rate, folds=folds, seed=seed, target_recall=target_recall)
        if out is not None:
            model.save(out)
    return model


def load(directory: str | Path, *, device: str = "auto", batch_size: int = 16, workers: int | None = None,
         max_pixels: int = DEFAULT_MAX_PIXELS, backend: str = "auto", spin: bool = False) -> AnomalyModel:
    """A model directory written by `fit`, with the same scores as when it was saved.

    `backend`: what scores decoded images. "onnx" is the model's exported scoring graph in ONNX
    Runtime (CPU only; exported once into DIR/export/ and checked against the eager code, scores
    within 1e-3 of the largest); "torch" the eager code; "auto" ONNX Runtime on a CPU where it is
    installed, and eager torch, with a warning, where the graph cannot be exported, checked or
    written. `spin` as in `inference.onnx.OnnxModel`: off by default, so that idle graph threads
    leave the cores to decoding (48-50 images/s against 44-48 spinning, PatchCore on 2 cores).
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    info, tensors = read_model_files(directory)
    if info.get("method") not in DETECTORS:
        raise UserError(f"{directory}: unknown method {info.get('method')!r}")
    on_cpu = resolve_device(device).type == "cpu"
    if backend == "onnx" and not on_cpu:
        raise UserError("--backend onnx runs on the CPU; use --device cpu")
    graph = backend == "onnx" or (backend == "auto" and on_cpu and onnx_available())
    detector = DETECTORS[info["method"]](**info["detector"])
    model = AnomalyModel.restore(info, tensors, detector, batch_size=batch_size, workers=_workers(workers, device),
                                 max_pixels=max_pixels, device=device)
    if not graph:
        return model
    try:
        path, _ = exported_graph(model, directory)
        return model.use_graph(OnnxScorer(path, model, torch.get_num_threads(), spin), "onnx")
    except Exception as exc:  # auto: the eager code is the reference, so fall back to it
        if backend == "onnx":
            raise
        log.warning("scoring in eager torch: the ONNX scoring graph could not be used (%s)", first_line(exc, 200))
        return model


def predict(model: str | Path | AnomalyModel, paths: Sequence[str | Path], *, out: str | Path | None = None,
            heatmaps: str | Path | None = None, shard: Shard | None = None, **load_options) -> list[dict]:
    """One row per input image (folders are searched): score, decision at the saved threshold, and
    the heat-map file when `heatmaps` is a folder; unreadable files are rows with their reason.

    With a `shard`, only its contiguous share of the inputs is scored, into its part file beside
    `out` (`visiontune.data.shards`; `merge_csv_shards` joins them); heat maps keep the numbers
    of an unsharded run. A shard found complete returns no rows.
    """
    model = model if isinstance(model, AnomalyModel) else load(model, **load_options)
    files = PathList.of(expand_image_paths(paths if isinstance(paths, PathList) else [str(p) for p in paths]))
    heat_dir = Path(heatmaps) if heatmaps is not None else None
    if shard is None:
        return _predict_rows(model, files, out, heat_dir, 0)
    if out is None:
        raise UserError("--shard needs --out: each shard writes its part beside it")
    rows: list[dict] = []
    start = shard.bounds(len(files))[0]
    run_shard(Path(out), files, shard,
              lambda mine, part: rows.extend(_predict_rows(model, mine, part, heat_dir, start)))
    return rows


def _predict_rows(model: AnomalyModel, files: Sequence[str], out: str | Path | None, heat_dir: Path | None,
                  first_number: int) -> list[dict]:
    """Rows of `files` in order, written to `out` when given; heat maps numbered from `first_number`."""
    rows: dict[str, dict] = {}
    position = {path: first_number + i for i, path in enumerate(files)} if heat_dir is not None else {}
    for part in model.score_batches(files) if len(files) else ():
        for path, score, anomaly_map in zip(part.paths, part.scores, part.maps):
            decision = "anomalous" if score >= model.threshold_ else GOOD
            row = {"path": str(path), "score": float(score), "decision": decision, "threshold": model.threshold_}
            if heat_dir is not None:
                row.update(_write_heatmap(model, Path(path), anomaly_map, heat_dir, position[path]))
            rows[str(path)] = row
        for skipped in part.skipped:
            rows[skipped.path] = {"path": skipped.path, "decision": "skipped", "reason": skipped.reason}
    ordered = [rows[str(path)] for path in files]
    if out is not None:
        write_text_atomic(Path(out), _csv_text(ordered))
    return ordered


def evaluate(model: str | Path | AnomalyModel, data: str | Path, *, out: str | Path | None = None,
             **load_options) -> dict:
    """Image AUROC, F1 at the saved and at the best threshold, recall and false-alarm rate at the
    saved one with 95% intervals, pixel AUROC and AUPRO when masks exist, per-defect-type rows;
    with `out`, also `out/metrics.json`, `out/score_histogram.png` and `out/report.html`."""
    images = labelled_images(data)
    model = model if isinstance(model, AnomalyModel) else load(model, **load_options)
    return evaluate_model(model, images, Path(out) if out is not None else None)


def split_holdout(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out good) by a seeded shuffle; at least one held out and two to train on."""
    held = max(1, round(fraction * len(files)))
    if len(files) - held < 2:
        raise UserError(f"need at least 3 good images (2 to fit, 1 held out for the threshold), got {len(files)}")
    order = np.random.default_rng(seed).permutation(len(files))
    holdout = set(order[:held].tolist())
    return ([f for i, f in enumerate(files) if i not in holdout], [f for i, f in enumerate(files) if i in holdout])


def _check_options(coreset_ratio: float, holdout_fraction: float, false_alarm_rate: float,
                   image_size: int | None, batch_size: int) -> None:
    checks = [
        (0 < coreset_ratio <= 1, f"--coreset-ratio must be in (0, 1], got {coreset_ratio}"),
        (0 < holdout_fraction < 1, f"--holdout-fraction must be in (0, 1), got {holdout_fraction}"),
        (0 <= false_alarm_rate < 1, f"--false-alarm-rate must be in [0, 1), got {false_alarm_rate}"),
        (image_size is None or image_size >= 32, f"--image-size must be at least 32, got {image_size}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _check_target_recall(target_recall: float | None, val_defects: str | Path | None) -> None:
    if target_recall is None:
        return
    if not 0 < target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], got {target_recall}")
    if val_defects is None:
        raise UserError("--target-recall needs --val-defects: labelled defect images to measure the recall on")


def _workers(workers: int | None, device: str) -> int:
    """Decoding workers; on a CPU, planned with torch's threads for the cores free now, as for
    frozen features (devices.plan_cpu): one thread beside a busy neighbour (2 ran the backbone
    1.7x slower), and decoding in this process up to 3 free cores (a worker process beside 2
    threads: 17-22 instead of 21-25 images/s for `evaluate` on 2 cores; through the ONNX graph,
    33 instead of 48-50 images/s for PatchCore on 2 cores, docs/benchmarks.md)."""
    if resolve_device(device).type == "cpu":
        return plan_cpu(workers=workers).apply().workers
    return default_workers() if workers is None else workers


def _write_heatmap(model: AnomalyModel, path: Path, anomaly_map: np.ndarray, folder: Path, number: int) -> dict:
    try:
        image = load_rgb(path, model.max_pixels)
    except ImageLoadError as exc:  # readable a moment ago; changed on disk since
        return {"reason": f"heatmap not written: {exc}"}
    target = folder / f"{number:05d}_{path.stem}.png"
    overlay = heatmap_overlay(image, anomaly_map, *model.map_range_)
    atomic_write(target, lambda tmp: overlay.save(tmp, format="PNG"))
    return {"heatmap": str(target)}


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
