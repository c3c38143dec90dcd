"""PatchCore fitted on 10,000 generated images on the CPU: wall time, peak RSS, coreset time,
scoring images/s and image/pixel AUROC; plus `--auroc-check`, the PatchCore row of
anomaly_vs_anomalib.py (200 good 512 px textures at 256 px) without anomalib, to show the
changes keep that benchmark's AUROC.

    PYTHONPATH=. python benchmarks/patchcore_scale.py [--images 10000] [--size 128] [--out runs/bench-patchcore-scale]
    PYTHONPATH=. python benchmarks/patchcore_scale.py --auroc-check [--fit-seed N] [--out runs/bench-patchcore-auroc]

Data: anomaly_vs_anomalib.make_dataset's grainy, unevenly lit textures with drawn scratches,
stored at --px (128 px here: 10,000 images at 512 px would take most of the time to decode).
tf_efficientnet_lite0 with the shared weights, layers blocks.2 + blocks.4, 1% coreset, 10% of the
good images held out for the threshold, as in anomaly_vs_anomalib.py. The fit runs in a worker
subprocess (its peak RSS, and that of its loader processes, is the figure reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_common import BACKBONE, LAYERS, load_average, peak_rss_gib, run_worker
from anomaly_vs_anomalib import make_dataset, scores_accuracy, test_paths
from anomaly_vs_anomalib import worker as comparison_worker


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: with the wall time, how much of the
    shared cores the fit got."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def scale_worker(args: argparse.Namespace) -> dict:
    import torch

    from visiontune import anomaly

    out = Path(args.out) / "model"
    shutil.rmtree(out, ignore_errors=True)
    load_before = load_average()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    model = anomaly.fit(args.data, method="patchcore", backbone=BACKBONE, layers=LAYERS, image_size=args.size,
                        coreset_ratio=args.coreset_ratio, weights=args.weights, batch_size=32, out=out, device="cpu")
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_cpu_s": cpu_seconds() - cpu_before, "fit_timings": model.fit_info_["timings"], "fit_rss_gib": peak_rss_gib(),
              "train_images": model.fit_info_["train_images"], "memory_bank": list(model.detector.memory_bank_.shape),
              "torch_threads": torch.get_num_threads(), "load_before_fit": load_before, "load_after_fit": load_average()}
    paths = test_paths(Path(args.data))
    rates = []
    for _ in range(2):
        started = time.perf_counter()
        scored = model.score(paths)
        rates.append(len(paths) / (time.perf_counter() - started))
    import numpy as np

    np.save(Path(args.out) / "maps.npy", scored.maps)
    return result | {"scoring_images_per_s": rates, "paths": [str(p) for p in scored.paths],
                     "scores": scored.scores.tolist(), "maps": str(Path(args.out) / "maps.npy"),
                     "peak_rss_gib": peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve()
    parser.add_argument("--shared", default=str(here.parents[1].parent / "shared"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--images", type=int, default=10000, help="good training images (10% held out)")
    parser.add_argument("--test", type=int, default=40, help="good and as many scratched test images")
    parser.add_argument("--px", type=int, default=128, help="stored image size")
    parser.add_argument("--size", type=int, default=128, help="model input size")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--auroc-check", action="store_true",
                        help="anomaly_vs_anomalib.py's visiontune PatchCore row instead (200 images, 512 px, 256 px input)")
    parser.add_argument("--label", default="", help="a name for this code version in the results file")
    parser.add_argument("--fit-seed", type=int, default=0, help="--auroc-check: the fit's seed (the data stay seed 0)")
    parser.add_argument("--results", default="benchmarks/results/patchcore_scale_cpu.json")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--weights")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(scale_worker(args)), flush=True)
        return

    args.weights = str(Path(args.shared) / "weights" / f"{BACKBONE}.in1k.safetensors")
    if not Path(args.weights).is_file():
        raise SystemExit(f"needs {args.weights}")
    if args.auroc_check:
        args.out = args.out or "runs/bench-patchcore-auroc"
        args.size, args.px, args.images, args.test = 256, 512, 200, 40
    args.out = args.out or "runs/bench-patchcore-scale"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed = 0 if args.auroc_check else 2
    data = make_dataset(out / "data" / f"scratches-{args.images}-{args.px}", args.images, args.test, args.px, seed=seed)
    generate_s = time.perf_counter() - started
    print(f"data ready in {generate_s:.0f} s: {data}", flush=True)
    if args.auroc_check:
        result = comparison_worker(Path(sys.executable), "visiontune", "patchcore", args, data)
    else:
        result = run_worker(Path(sys.executable), __file__,
                            ["--worker", "--data", str(data), "--out", str(out), "--weights", args.weights,
                             "--size", str(args.size), "--coreset-ratio", str(args.coreset_ratio)],
                            stderr_log=out / "worker.log")
    if "error" not in result:
        result |= scores_accuracy(result, args.size, data)
        for key in ("paths", "scores", "maps"):
            result.pop(key)
    record = {
        "label": args.label, "kind": "auroc-check" if args.auroc_check else "scale", "fit_seed": args.fit_seed,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; shared with other engineers' jobs",
        "settings": {"backbone": BACKBONE, "layers": LAYERS, "image_size": args.size, "stored_px": args.px,
                     "good_images": args.images, "test_images": 2 * args.test, "coreset_ratio": args.coreset_ratio},
        "generate_s": generate_s, **result,
    }
    results = Path(args.results)
    runs = json.loads(results.read_text()) if results.is_file() else []
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(runs + [record], indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
