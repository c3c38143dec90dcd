"""Choosing the anomaly detectors' defaults on real defects: a grid on the magnetic-tile half's
validation part only (anomaly_real.py's seeded split, `--part val`; the test part is never read).

    python benchmarks/anomaly_tuning.py [--shared ../shared] [--seed 0] [--grid patchcore,padim]

The backbone's maps (tf_efficientnet_lite0, shared weights, 256 px, blocks.1 / blocks.2 / blocks.4)
of the fit images and of the validation images are computed once; each setting then embeds them,
fits the detector, scores the validation images and is measured by anomaly_common.accuracy (image
and pixel AUROC, AUPRO, per-type image AUROC), the code the comparison with anomalib uses.
Settings varied, around the defaults shared with anomalib (layers blocks.2 + blocks.4, 1% coreset,
100 PaDiM channels): PatchCore's neighbourhood (avg-pool size), its coreset (streamed in chunks of
2^16 patches, or one greedy pass over all patches as anomalib does) and coreset seed; PaDiM's
covariance regularisation and channel count; for both, the map smoothing (sigma) and the image
score (the detector's own, the smoothed map's maximum, or the mean of its top 1% pixels).
Results: benchmarks/results/anomaly_tuning_<machine>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_common import BACKBONE, accuracy, load_average
from anomaly_real import build_layout, draw_split

HERE = Path(__file__).resolve().parent
LEVELS = ["blocks.1", "blocks.2", "blocks.4"]
SIGMAS = (2.0, 4.0, 8.0)
TOP_SHARE = 0.01
# names in the results -> anomaly_map.MapScoring's image_score (the detector's own only where it has one)
IMAGE_SCORES = {"map_max": "max", "map_top1pct": "top-mean", "detector": "detector"}


def cached_maps(paths: list[str], weights: str, size: int) -> list[torch.Tensor]:
    """The backbone's maps at LEVELS for `paths`, each [n, C, h, w] float32 on the CPU."""
    from torch.utils.data import DataLoader

    from visiontune.anomaly.data import anomaly_transform
    from visiontune.data.dataset import ImageFiles, collate_image_files
    from visiontune.data.transforms import Preprocessing
    from visiontune.models.extractor import create_extractor

    extractor = create_extractor(BACKBONE, LEVELS, False, weights, 0)
    transform = anomaly_transform(Preprocessing.from_model(extractor.model, size))
    network = extractor.folded()
    loader = DataLoader(ImageFiles(paths, transform, 10**9), batch_size=32, num_workers=1,
                        collate_fn=collate_image_files)
    parts: list[list[torch.Tensor]] = [[] for _ in LEVELS]
    with torch.inference_mode():
        for images, indices, bad in loader:
            if bad or len(indices) != len(images):
                raise SystemExit(f"unreadable images: {bad}")
            for level, feature_map in enumerate(network(images)):
                parts[level].append(feature_map.contiguous().clone())
    return [torch.cat(level) for level in parts]


def embeddings(maps: list[torch.Tensor], layers: list[str], pool: int, mode: str, batch: int = 32):
    from visiontune.anomaly.components.features import patch_embedding

    chosen = [maps[LEVELS.index(name)] for name in layers]
    for start in range(0, len(chosen[0]), batch):
        yield patch_embedding([m[start:start + batch] for m in chosen], pool_size=pool, mode=mode)


def evaluate(detector, fit_maps, val_maps, layers, pool, mode, paths, truth, size) -> list[dict]:
    """Fit once, then one row per (sigma, image score), scored as visiontune.anomaly scores them."""
    from visiontune.anomaly.components.anomaly_map import MapScoring

    started = time.perf_counter()
    detector.fit(embeddings(fit_maps, layers, pool, mode))
    fit_s = time.perf_counter() - started
    patch, own = [], []
    with torch.inference_mode():
        for embedding in embeddings(val_maps, layers, pool, mode):
            patch_scores, scores = detector.score(embedding)
            patch.append(patch_scores)
            own.append(scores)
    patch_scores = torch.cat(patch)
    own_scores = torch.cat(own) if own[0] is not None else None
    rules = IMAGE_SCORES if own_scores is not None else {k: v for k, v in IMAGE_SCORES.items() if v != "detector"}
    rows = []
    for sigma in SIGMAS:
        for name, rule in rules.items():
            scores, maps = MapScoring(sigma, rule, TOP_SHARE).apply(patch_scores, own_scores, size)
            measured = accuracy(paths, scores.tolist(), maps.numpy(), truth, size)
            rows.append({"sigma": sigma, "image_score": name, "fit_s": round(fit_s, 2), **measured})
    return rows


def patchcore_grid(fit_maps, val_maps, paths, truth, size) -> list[dict]:
    from visiontune.anomaly.patchcore import PatchCore

    rows = []
    settings = [(pool, chunk, 0) for pool, chunk in itertools.product((1, 3, 5), (2**16, 2**20))]
    settings += [(3, chunk, seed) for chunk in (2**16, 2**20) for seed in (1, 2)]
    for pool, chunk, seed in settings:
        detector = PatchCore(coreset_ratio=0.01, chunk_patches=chunk, seed=seed)
        setting = {"method": "patchcore", "layers": "blocks.2+blocks.4", "pool": pool,
                   "coreset": "streamed" if chunk < 2**20 else "one pass", "seed": seed}
        for row in evaluate(detector, fit_maps, val_maps, ["blocks.2", "blocks.4"], pool, "bilinear",
                            paths, truth, size):
            rows.append(setting | row)
        print(f"patchcore {setting}: {rows[-1]['fit_s']} s", flush=True)
    return rows


def padim_grid(fit_maps, val_maps, paths, truth, size) -> list[dict]:
    from visiontune.anomaly.padim import Padim

    rows = []
    settings = [(["blocks.2", "blocks.4"], n, reg, 0) for n, reg in itertools.product((100, 152), (0.01, 0.1, 1.0))]
    settings += [(["blocks.2", "blocks.4"], 100, 0.01, seed) for seed in (1, 2)]
    settings += [(LEVELS, 100, 0.01, 0), (LEVELS, 176, 0.01, 0)]
    for layers, n_features, regularization, seed in settings:
        detector = Padim(n_features=n_features, regularization=regularization, seed=seed)
        setting = {"method": "padim", "layers": "+".join(layers), "n_features": n_features,
                   "regularization": regularization, "seed": seed}
        for row in evaluate(detector, fit_maps, val_maps, layers, 1, "nearest", paths, truth, size):
            rows.append(setting | row)
        print(f"padim {setting}: {rows[-1]['fit_s']} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("per_defect_type", "images", "good_images", "defect_images")]
    types = sorted(rows[0]["per_defect_type"])
    lines = ["| " + " | ".join(keys + types) + " |", "|" + " --- |" * (len(keys) + len(types))]
    for row in sorted(rows, key=lambda r: -r["image_auroc"]):
        cells = [f"{row[k]:.4f}" if isinstance(row[k], float) and k not in ("sigma", "regularization", "fit_s")
                 else str(row[k]) for k in keys]
        cells += [f"{row['per_defect_type'][t]['image_auroc']:.3f}" for t in types]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(HERE.parents[1] / "shared"))
    parser.add_argument("--seed", type=int, default=0, help="of the split")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--grid", default="patchcore,padim")
    parser.add_argument("--out", default="runs/bench-anomaly-tuning")
    parser.add_argument("--machine", default="cpu")
    args = parser.parse_args()
    shared = Path(args.shared).resolve()
    weights = str(shared / "weights" / f"{BACKBONE}.in1k.safetensors")
    split = draw_split(shared / "data" / "magnetic-tile", args.seed)
    _, manifest = build_layout(split, "val", Path(args.out) / "data" / f"seed{args.seed}-val")
    truth = {path: (entry["type"], entry["mask"] and Path(entry["mask"]))
             for path, entry in manifest["images"].items() if "/test/" in path}
    paths = sorted(truth)
    started = time.perf_counter()
    fit_maps = cached_maps(manifest["fit"], weights, args.size)
    val_maps = cached_maps(paths, weights, args.size)
    print(f"maps of {len(manifest['fit'])} fit and {len(paths)} validation images in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    grids = {"patchcore": patchcore_grid, "padim": padim_grid}
    rows = [row for name in args.grid.split(",") for row in grids[name](fit_maps, val_maps, paths, truth, args.size)]
    results = HERE / "results" / f"anomaly_tuning_{args.machine}.json"
    results.write_text(json.dumps({
        "command": " ".join(sys.argv), "machine": platform.platform(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average_end": load_average(), "split_seed": args.seed,
        "part": "val", "counts": manifest["counts"], "rows": rows}, indent=1) + "\n")
    for method in dict.fromkeys(r["method"] for r in rows):
        print(f"\n### {method}\n" + table([r for r in rows if r["method"] == method]))


if __name__ == "__main__":
    main()
