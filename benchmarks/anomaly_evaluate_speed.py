"""Images/s of `visiontune anomaly evaluate` end to end on real defects, and where the time goes.

    PYTHONPATH=. python benchmarks/anomaly_evaluate_speed.py [--shared /work/shared]
        [--work /tmp/vt-evaluate-speed] [--methods patchcore,padim] [--runs N] [--profile]
        [--batch-sizes 16,4] [--plans 2x0,1x0] [--default-malloc] [--json out.json]

Data: the magnetic-tile set in `shared/data/magnetic-tile` (`MT_<Class>/Imgs/<name>.jpg`, same-name
.png masks). Split and laid out by benchmarks/anomaly_real.py (seed 0, `--part all`): a seeded 60%
of MT_Free to fit on, the other 40% and every defect image (384 images) to evaluate, as symlinks
in an MVTec AD-like folder under --work. Each method (tf_efficientnet_lite0 from the shared weights
file, its default layers: blocks.2 + blocks.4 for PatchCore with a 1% coreset, blocks.1 + blocks.2
+ blocks.4 for PaDiM; 256 px) is fitted once and saved under --work; later invocations load it,
so runs of two versions of the code (PYTHONPATH) score the same model.
Each run times `anomaly.evaluate(model, data, out=...)` end to end (report included, written to a
temporary folder) with the load average, CPU time and page faults, and per phase by wrapping the
functions it calls (nested phases are inside their parents' times). The metrics are printed in
full precision, to compare versions. Like the CLI's evaluate, the process first has glibc keep
freed memory (devices.reuse_freed_memory) unless --default-malloc. --batch-sizes and --plans
(torch threads x loader workers, instead of the planned ones) cycle through variants per run.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import json
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from visiontune import anomaly, devices

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_real import build_layout, draw_split  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
# (module, attribute) pairs timed when they exist; the label says what the phase is.
PHASES = (
    ("visiontune.anomaly.base", "AnomalyModel.score", "score (decode + features + detector + maps)"),
    ("visiontune.anomaly.base", "AnomalyModel._embed", "  backbone + embedding"),
    ("visiontune.anomaly.base", "AnomalyModel.score_embedding", "  detector + anomaly maps"),
    ("visiontune.anomaly.evaluation", "_masks", "masks"),
    ("visiontune.anomaly.evaluation", "image_metrics", "image metrics"),
    ("visiontune.anomaly.metrics", "RankedPixels.__init__", "sorting the pixels (pixel metrics below use it)"),
    ("visiontune.anomaly.evaluation", "pixel_metrics", "pixel metrics (pixel AUROC + AUPRO)"),
    ("visiontune.anomaly.evaluation", "per_defect_type", "per defect type"),
    ("visiontune.anomaly.evaluation", "write_report", "report (thumbnails, histogram, html)"),
)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold", "f1_at_best_threshold", "best_threshold",
               "recall_at_threshold", "false_alarm_rate_at_threshold")


def fitted(method: str, data: Path, models: Path, weights: Path) -> Path:
    directory = models / method
    if not (directory / "model.json").is_file():
        started = time.perf_counter()
        anomaly.fit(data, method=method, backbone=BACKBONE, weights=weights, image_size=256, coreset_ratio=0.01,
                    out=directory)
        print(f"fitted {method} in {time.perf_counter() - started:.1f} s", flush=True)
    return directory


class PhaseTimer:
    """Total wall time inside each of PHASES' functions while active."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._undo: list = []

    def __enter__(self) -> PhaseTimer:
        for module_name, attribute, label in PHASES:
            owner = importlib.import_module(module_name)
            *parents, name = attribute.split(".")
            for parent in parents:
                owner = getattr(owner, parent, None)
            if owner is not None and hasattr(owner, name):
                original = getattr(owner, name)
                setattr(owner, name, self._timed(original, label))
                self._undo.append((owner, name, original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def _timed(self, function, label: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - started
        return timed


def cpu_seconds() -> tuple[float, int]:
    """CPU time and page faults of this process and its finished children (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            own.ru_minflt + children.ru_minflt)


def run_once(model, data: Path, profile: Path | None) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out, PhaseTimer() as phases:
        profiler = cProfile.Profile() if profile else None
        started, cpu_started = time.perf_counter(), cpu_seconds()
        if profiler:
            profiler.enable()
        metrics = anomaly.evaluate(model, data, out=out)
        if profiler:
            profiler.disable()
        seconds, (cpu, faults) = time.perf_counter() - started, np.subtract(cpu_seconds(), cpu_started)
    if profiler:
        profiler.dump_stats(profile)
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(35)
    images = metrics["images"]
    return {"seconds": seconds, "images_per_s": images / seconds, "cpu_ms_per_image": 1e3 * cpu / images,
            "page_faults_per_image": int(faults) // images, "threads": torch.get_num_threads(),
            "workers": model.workers, "load_before": load_before, "load_after": os.getloadavg(),
            "phases": phases.totals, "metrics": metrics}


def main() -> None:
    args = _arguments()
    if not args.default_malloc and hasattr(devices, "reuse_freed_memory"):  # code before it had none
        print(f"malloc keeps freed memory: {devices.reuse_freed_memory()}")
    split = draw_split(args.shared / "data" / "magnetic-tile", seed=0)
    data, _ = build_layout(split, "all", args.work / "data")
    weights = args.shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b] or [None]
    plans = [tuple(map(int, p.split("x"))) for p in args.plans.split(",") if p] or [None]
    variants = [(b, p) for b in batch_sizes for p in plans]
    results = {}
    for method in args.methods.split(","):
        directory = fitted(method, data, args.work / "models", weights)
        for run in range(args.runs * len(variants)):
            batch_size, plan = variants[run % len(variants)]
            options = ({"batch_size": batch_size} if batch_size else {}) | ({"workers": plan[1]} if plan else {})
            model = anomaly.load(directory, **options)
            if plan:
                torch.set_num_threads(plan[0])
            row = run_once(model, data, args.work / f"{method}-{run}.prof" if args.profile else None)
            results.setdefault(method, []).append(row | {"batch_size": model.batch_size})
            _print(method, run, row | {"batch_size": model.batch_size})
    if args.json:
        machine = {"cores": os.cpu_count(), "torch": torch.__version__}
        for rows in results.values():
            for row in rows:
                row["metrics"].pop("report", None)
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1, default=float) + "\n")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("/work/shared"))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vt-evaluate-speed")
    parser.add_argument("--methods", default="patchcore,padim")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--batch-sizes", default="")
    parser.add_argument("--plans", default="", help="THREADSxWORKERS,...")
    parser.add_argument("--profile", action="store_true", help="cProfile each run into --work/<method>-<run>.prof")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc as it is")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def _print(method: str, run: int, row: dict) -> None:
    print(f"\n{method} run {run}, batch {row['batch_size']}: {row['metrics']['images']} images in "
          f"{row['seconds']:.1f} s = {row['images_per_s']:.2f} images/s ({row['cpu_ms_per_image']:.0f} ms CPU time "
          f"and {row['page_faults_per_image']} page faults per image, {row['threads']} torch thread(s), "
          f"{row['workers']} loader worker(s)); load average {row['load_before'][0]:.2f} before, "
          f"{row['load_after'][0]:.2f} after")
    for label, seconds in row["phases"].items():
        print(f"  {label:48s} {seconds:7.2f} s")
    print("  metrics: " + ", ".join(f"{k} {row['metrics'][k]!r}" for k in METRIC_KEYS))
    print("  per type pixel AUROC: " + ", ".join(
        f"{k} {v['pixel_auroc']!r}" for k, v in row["metrics"]["per_defect_type"].items()), flush=True)


if __name__ == "__main__":
    main()
