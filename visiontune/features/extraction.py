"""`visiontune features`: frozen features of image files written to one .npz / .safetensors file.

With a `shard`, one contiguous share of the inputs goes to its part file beside `out`
(`visiontune.data.shards`); `features.store.merge_feature_shards` joins the parts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from visiontune.config import TrainConfig
from visiontune.data.dataset import default_workers
from visiontune.data.paths import PathList, expand_image_paths
from visiontune.data.shards import Shard, run_shard
from visiontune.data.sources import discover
from visiontune.data.transforms import Preprocessing
from visiontune.devices import plan_cpu, resolve_device
from visiontune.errors import UserError
from visiontune.features.projection import fit_projection, project_chunks
from visiontune.features.store import check_out_path, save_features, temporary_rows
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.extractor import (
    POOLS,
    FeatureExtractor,
    check_layers,
    create_extractor,
    iter_features,
    run_extractor,
)

log = logging.getLogger(__name__)
SPLIT_DEFAULTS = {name: TrainConfig.model_fields[name].default
                  for name in ("label_regex", "val_fraction", "test_fraction", "seed", "max_pixels")}


@dataclasses.dataclass
class Inputs:
    """What to extract: files with their class index (-1 unlabelled) and split ("" unsplit)."""

    paths: Sequence[str]
    labels: np.ndarray
    classes: list[str]
    splits: Sequence[str]

    def rows(self, start: int, stop: int) -> Inputs:
        return Inputs(self.paths[start:stop], self.labels[start:stop], self.classes, self.splits[start:stop])


def list_inputs(data, label_regex: str | None = SPLIT_DEFAULTS["label_regex"],
                val_fraction: float = SPLIT_DEFAULTS["val_fraction"],
                test_fraction: float = SPLIT_DEFAULTS["test_fraction"],
                seed: int = SPLIT_DEFAULTS["seed"]) -> Inputs:
    """A data source (folder or CSV) split exactly as `train` splits it, or a list of files / folders."""
    if isinstance(data, (str, Path)):
        samples = discover(data, label_regex, val_fraction, test_fraction, seed).samples
        classes = sorted({s.label for s in samples})
        index = {label: i for i, label in enumerate(classes)}
        return Inputs([s.path for s in samples], np.array([index[s.label] for s in samples], dtype=np.int64),
                      classes, [s.split for s in samples])
    paths = PathList.of(expand_image_paths(data if isinstance(data, PathList) else list(data)))
    return Inputs(paths, np.full(len(paths), -1, dtype=np.int64), [], [""] * len(paths))


def build_extractor(model: str | None, run: str | Path | None, layers: Sequence[str] | None, weights, pretrained: bool,
                    image_size: int | None, seed: int) -> tuple[FeatureExtractor, Preprocessing]:
    """The backbone (`model` with its weights, or a fine-tuned `run`) and its evaluation preprocessing."""
    if (model is None) == (run is None):
        raise UserError("pass either a backbone (--model NAME) or a trained run (--run RUN), not both or neither")
    if run is not None:
        if weights is not None:
            raise UserError("--weights applies to --model; a run brings its own fine-tuned weights")
        trained = ClassifierRun(run)
        extractor = run_extractor(trained, check_layers(trained.metadata["model"], layers))
        preprocessing = trained.preprocessing
        if image_size:
            preprocessing = dataclasses.replace(preprocessing, input_size=image_size)
        return extractor, preprocessing
    extractor = create_extractor(model, check_layers(model, layers), pretrained, weights, seed)
    return extractor, Preprocessing.from_model(extractor.model, image_size)


def plan_extraction(device: str, threads: int | None, workers: int | None) -> tuple[torch.device, int]:
    """The device and loader workers of a feature pass: on a CPU, threads and workers planned for
    the cores free now (and applied); on a GPU, the given workers or the default."""
    torch_device = resolve_device(device)
    if torch_device.type == "cpu":
        return torch_device, plan_cpu(threads, workers).apply().workers
    return torch_device, default_workers() if workers is None else workers


def extract(data, *, out: str | Path, model: str | None = None, run: str | Path | None = None,
            layers: Sequence[str] | None = None, pool: str = "avg", weights: str | Path | None = None,
            pretrained: bool = True, image_size: int | None = None, project_dim: int | None = None,
            projection: str = "random", label_regex: str | None = SPLIT_DEFAULTS["label_regex"],
            val_fraction: float = SPLIT_DEFAULTS["val_fraction"],
            test_fraction: float = SPLIT_DEFAULTS["test_fraction"], seed: int = SPLIT_DEFAULTS["seed"],
            batch_size: int = 32, workers: int | None = None, threads: int | None = None, device: str = "auto",
            max_pixels: int = SPLIT_DEFAULTS["max_pixels"], shard: Shard | None = None) -> dict:
    """Features of every image in `data` (a data source, split as `train` splits it, or a list of
    files and folders) written to `out` (.npz or .safetensors) with paths, labels and splits.

    `pool` avg / max gives one `features` array [N, sum of channels over layers]; `none` gives one
    `features.<layer>` grid [N, H, W, C] per layer. `project_dim` reduces pooled features with a
    seeded random projection or a PCA fitted on the training rows. Returns what was written; with
    a `shard`, its part is written (or found complete: "shard_complete") instead of `out`.
    """
    started = time.perf_counter()
    out = check_out_path(out)
    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if project_dim is not None and pool == "none":
        raise UserError("--project-dim needs pooled features (--pool avg or max)")
    if shard is not None and project_dim is not None:
        raise UserError("--project-dim cannot be sharded (a PCA is fitted on all rows); extract without it")
    inputs = list_inputs(data, label_regex, val_fraction, test_fraction, seed)
    extractor, preprocessing = build_extractor(model, run, layers, weights, pretrained, image_size, seed)
    torch_device, workers = plan_extraction(device, threads, workers)
    load_s = time.perf_counter() - started
    options = dict(pool=pool, batch_size=batch_size, workers=workers, device=torch_device, max_pixels=max_pixels,
                   project_dim=project_dim, projection=projection, seed=seed, run=run)
    if shard is None:
        return _extract(inputs, out, extractor, preprocessing, started, load_s, **options)
    result = {"out": str(shard.part_path(out)), "images": 0, "arrays": {}, "skipped": [], "layers": extractor.layers,
              "workers": workers, "timings": {"setup_s": round(load_s, 3), "features_s": 0.0, "total_s": 0.0}}

    def write_part(paths: Sequence[str], part: Path) -> None:
        result.update(_extract(inputs.rows(*shard.bounds(len(inputs.paths))), part, extractor, preprocessing,
                               started, load_s, **options))

    done = run_shard(out, inputs.paths, shard, write_part)
    return {**result, "shard": str(shard), "shard_complete": done.skipped_existing}


def _extract(inputs: Inputs, out: Path, extractor: FeatureExtractor, preprocessing: Preprocessing, started: float,
             load_s: float, *, pool: str, batch_size: int, workers: int, device: torch.device, max_pixels: int,
             project_dim: int | None, projection: str, seed: int, run) -> dict:
    """One feature pass over `inputs`, written to `out`; see `extract`."""
    folder, rows = temporary_rows(out, len(inputs.paths))
    with folder:
        kept, skipped = [], []
        batches = iter_features(extractor, preprocessing.eval_transform(), inputs.paths, pool, batch_size,
                                workers, device, max_pixels, draft_size=preprocessing.resize_size,
                                preprocessing=preprocessing)
        for batch in batches:
            rows.append(batch.arrays)
            kept += batch.indices
            skipped += [{"path": inputs.paths[i], "reason": reason} for i, reason in batch.skipped]
        if not kept:
            raise UserError("none of the images could be read; see the skipped files")
        features_s = time.perf_counter() - started - load_s
        for row in skipped:
            log.warning("skipped %s: %s", row["path"], row["reason"])
        arrays = rows.filled()
        splits = [inputs.splits[i] for i in kept]
        meta = {"model": extractor.backbone, "run": str(run) if run is not None else None,
                "layers": extractor.layers, "pool": pool, "preprocessing": preprocessing.to_dict(),
                "projection": None, "skipped": skipped}
        if project_dim is None:
            shapes = _save(out, arrays, inputs, kept, splits, meta)
        else:
            train_rows = np.flatnonzero(np.array(splits) == "train")
            fitted_on = "train split" if len(train_rows) else "all rows"  # unsplit file lists
            train_rows = train_rows if len(train_rows) else np.arange(len(kept))
            transformer = fit_projection(projection, project_dim, arrays["features"], train_rows, seed)
            meta["projection"] = {"kind": projection, "dim": project_dim, "seed": seed,
                                  "fitted_on": fitted_on if projection == "pca" else None}
            projected_folder, projected = temporary_rows(out, len(kept))
            with projected_folder:
                for chunk in project_chunks(transformer, arrays["features"]):
                    projected.append({"features": chunk})
                shapes = _save(out, projected.filled(), inputs, kept, splits, meta)
    return {"out": str(out), "images": len(kept), "arrays": shapes, "skipped": skipped, "layers": extractor.layers,
            "workers": workers, "timings": {"setup_s": round(load_s, 3), "features_s": round(features_s, 3),
                                            "total_s": round(time.perf_counter() - started, 3)}}


def _save(out: Path, arrays: dict, inputs: Inputs, kept: list[int], splits: list[str], meta: dict) -> dict:
    """Write the file; returns the shape of each feature array."""
    save_features(out, arrays, [inputs.paths[i] for i in kept], inputs.labels[kept], inputs.classes, splits, meta)
    return {name: list(array.shape) for name, array in arrays.items()}
