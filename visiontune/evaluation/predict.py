"""`visiontune predict`: labels for any number of images, streamed to CSV or JSON lines.

Rows are written as batches finish, so memory stays flat however many images there are. Binary
runs with a saved threshold (`evaluate --target-recall`) decide with it, on the uncalibrated
probabilities it was chosen on; a fitted temperature (`evaluate --temperature`) scales the
probabilities reported. A run with fitted OOD scorers (`visiontune ood fit`, or the end of `train`)
adds `ood_score` and `ood` to every row. With a `shard`, one part of the inputs is written
beside `out` (`visiontune.data.shards`), to be joined by `merge_csv_shards`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visiontune.data.paths import PathList, expand_image_paths
from visiontune.data.shards import Shard, ShardRun, run_shard
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.inference.engine import iter_logits, load_for_inference, plan_inference
from visiontune.io import atomic_write, write_csv_atomic
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.losses import probabilities
from visiontune.ood.fit import load_ood

FORMATS = (".csv", ".jsonl")


@dataclass
class Predictions:
    rows: list[dict] = field(default_factory=list)  # empty when streamed to a file
    written: int = 0
    skipped: list[dict] = field(default_factory=list)
    shard: ShardRun | None = None  # what a sharded run did (skipped_existing: it was complete)


def iter_rows(
    run: ClassifierRun, inputs: Sequence[str], top_k: int = 1, tta: bool = False, batch_size: int | None = None,
    workers: int | None = None, device: str = "auto", backend: str | None = None,
    precision: str | None = None, quantize: str | None = None, threads: int | None = None,
) -> Iterator[dict]:
    """One dict per image: a prediction row, or {"path", "skipped": reason} for an unreadable file.

    Unset speed options (batch size, workers, backend, precision, threads) come from
    `plan_inference` for the device; `quantize="int8"` runs the int8 ONNX model.
    """
    labels = run.labels
    top_k = max(1, min(top_k, len(labels)))
    threshold = run.threshold if len(labels) == 2 else None
    loss, temperature, ood = run.metadata["loss"], run.temperature, load_ood(run)
    paths = expand_image_paths(inputs)
    plan = plan_inference(resolve_device(device), batch_size, precision, backend, quantize, threads, workers)
    model, plan = load_for_inference(run, plan, fallback=backend is None and quantize is None)
    batches = iter_logits(model, run.preprocessing.eval_transform(), paths, max_pixels=run.config.max_pixels,
                          tta=tta, plan=plan, features=ood is not None, draft_size=run.preprocessing.resize_size,
                          preprocessing=run.preprocessing)
    for batch in batches:
        yield from ({"path": path, "skipped": reason} for path, reason in batch.skipped)
        if not batch.paths:
            continue
        raw, shown = raw_and_shown_probabilities(batch.logits, loss, temperature)
        flags = [{}] * len(batch.paths) if ood is None else ood.columns(ood.score(batch.logits, batch.features))
        for path, p, q, flag in zip(batch.paths, shown, raw, flags):
            yield {"path": path, **prediction_row(p, q, labels, top_k, threshold), **flag}


def raw_and_shown_probabilities(logits: np.ndarray, loss: str, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(uncalibrated, shown): the probabilities a saved threshold was chosen on (`evaluate
    --target-recall` works on the model's own), and those reported, after the fitted temperature."""
    raw = probabilities(logits, loss)
    return raw, raw if temperature == 1 else probabilities(logits, loss, temperature)


def prediction_row(p: np.ndarray, raw: np.ndarray, labels: list[str], top_k: int, threshold: dict | None) -> dict:
    """label, probability and top-k columns for one image's shown probabilities `p`.

    `threshold` (a binary run's saved {"positive", "threshold"}) decides instead of the argmax,
    applied to `raw`: the uncalibrated probabilities it was chosen on.
    """
    order = np.argsort(-p, kind="stable")[:top_k]
    chosen = int(order[0])
    if threshold is not None:
        positive = labels.index(threshold["positive"])
        chosen = positive if raw[positive] >= threshold["threshold"] else 1 - positive
    row = {"label": labels[chosen], "probability": float(p[chosen])}
    for rank, k in enumerate(order, start=1):
        row[f"top{rank}_label"], row[f"top{rank}_probability"] = labels[k], float(p[k])
    return row


def predict(
    run: ClassifierRun, inputs: Sequence[str], out: str | Path | None = None, shard: Shard | None = None, **options
) -> Predictions:
    """Predict `inputs` (files or folders, or a `PathList`); with `out`, rows stream to that .csv /
    .jsonl file; with a `shard`, only its share of the inputs, to its part file beside `out`."""
    result = Predictions()
    if out is None:
        if shard is not None:
            raise UserError("--shard needs --out: each shard writes its part beside it")
        for row in iter_rows(run, inputs, **options):
            (result.skipped if "skipped" in row else result.rows).append(row)
        return result
    out = Path(out)
    if out.suffix not in FORMATS:
        raise UserError(f"--out must end in {' or '.join(FORMATS)}, not {out.name!r}")
    if shard is None:
        return _predict_to(run, inputs, out, result, options, keep_empty=False)

    result.shard = run_shard(out, PathList.of(expand_image_paths(inputs)), shard,
                             lambda paths, part: _predict_to(run, paths, part, result, options, keep_empty=True),
                             extra_files=lambda part: [skipped_path(part)])
    return result


def skipped_path(out: Path) -> Path:
    """Where the unreadable files of a predictions file are listed."""
    return out.with_name(out.stem + ".skipped.csv")


class _NothingRead(Exception):
    """Raised inside the atomic write of a predictions file no row went into, so it is not moved into place."""


def _predict_to(run: ClassifierRun, inputs: Sequence[str], out: Path, result: Predictions, options: dict,
                keep_empty: bool) -> Predictions:
    """Stream the rows of `inputs` to `out` atomically, counting into `result`.

    When no image could be read, `out` is left as it was (an empty file would pass for a result, and
    would replace an earlier run's predictions) unless `keep_empty`: a shard's part is its proof of
    being done. The unreadable files are listed beside it either way.
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = None
            for row in iter_rows(run, inputs, **options):
                if "skipped" in row:
                    result.skipped.append(row)
                    continue
                if out.suffix == ".jsonl":
                    handle.write(json.dumps(row) + "\n")
                else:
                    writer = writer or _csv_writer(handle, row)
                    writer.writerow(row)
                result.written += 1
        if not result.written and not keep_empty:
            raise _NothingRead

    try:
        atomic_write(out, write)
    except _NothingRead:
        pass
    if result.skipped:
        write_csv_atomic(skipped_path(out), ["path", "skipped"], result.skipped)
    return result


def _csv_writer(handle, first_row: dict) -> csv.DictWriter:
    writer = csv.DictWriter(handle, fieldnames=list(first_row))
    writer.writeheader()
    return writer
