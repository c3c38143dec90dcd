"""Issue #3 target: `visiontune train` on hymenoptera with tf_efficientnet_lite0 reaches >= 93% val
accuracy within 6 epochs on CPU. Uses ../shared (not part of the repo), records per-epoch accuracy
and wall time, and prints a markdown row for docs/benchmarks.md.

    python benchmarks/hymenoptera_finetune.py [--shared ../shared] [--out runs/bench-hymenoptera] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

import visiontune

TARGET = 0.93


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--out", default="runs/bench-hymenoptera")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the cores free now); fix it to compare two versions exactly")
    args = parser.parse_args()
    shared = Path(args.shared)
    data, weights = shared / "data/hymenoptera", shared / "weights/tf_efficientnet_lite0.in1k.safetensors"
    if not data.is_dir() or not weights.is_file():
        raise SystemExit(f"needs {data} and {weights}")
    shutil.rmtree(args.out, ignore_errors=True)
    options = dict(model="tf_efficientnet_lite0", weights=str(weights), epochs=args.epochs, out=args.out)
    if args.threads:
        options.update(threads=args.threads, workers=0)

    started = time.perf_counter()
    elapsed: dict[int, float] = {}  # epoch (0: the linear probe) -> seconds since the start

    class Clock:
        def on_epoch_end(self, tuner, record) -> None:
            elapsed[record["epoch"]] = time.perf_counter() - started

    run = visiontune.fit(data, callbacks=[Clock()], **options)
    wall = time.perf_counter() - started

    with (run.dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    accuracies = [float(row["val_accuracy"]) for row in rows]  # epoch 0 is the linear probe
    reached = next((int(row["epoch"]) for row in rows if float(row["val_accuracy"]) >= TARGET), None)
    result = {
        "command": f"visiontune train {data} --model tf_efficientnet_lite0 --weights {weights} --epochs {args.epochs}",
        "val_accuracy_per_epoch": accuracies,
        "best_epoch": run.summary["best_epoch"],
        "best_val_accuracy": run.summary["val"]["accuracy"],
        "first_epoch_at_target": reached,
        "seconds_to_92": next((round(elapsed[int(r["epoch"])], 1) for r in rows if float(r["val_accuracy"]) >= 0.92), None),
        "wall_s": round(wall, 1),
        "epoch_s": [round(s, 1) for s in run.summary["timings"]["epochs_s"]],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
    }
    print(json.dumps(result, indent=2))
    status = "met" if run.summary["val"]["accuracy"] >= TARGET else "NOT met"
    print(
        f"\n| hymenoptera, lite0, {args.epochs} epochs | best val acc {result['best_val_accuracy']:.3f} "
        f"(epoch {result['best_epoch']}), >= {TARGET:.0%} first at epoch {reached} | {wall:.0f} s | target {status} |"
    )


if __name__ == "__main__":
    main()
