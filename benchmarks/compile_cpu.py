"""Issue 19: does `--compile` (torch.compile of the network) pay for a CPU training run?

Trains tf_efficientnet_lite0 on hymenoptera (../shared, not part of the repo) from the shared
weights twice in one process, eager then compiled (or --order compiled-first), with the same seed
and fixed threads, one frozen epoch (cached features: the network is not run) then --unfrozen
epochs. Reports each run's wall time and its per-epoch train seconds from metrics.csv: the first
unfrozen epoch carries the compilation, the later ones the steady-state speed.

    python benchmarks/compile_cpu.py [--unfrozen 3] [--threads 2] [--order eager-first] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import visiontune
from visiontune.bench.benchmark import machine

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def train(data: Path, weights: Path, out: Path, compiled: bool, unfrozen: int, threads: int) -> dict:
    started = time.perf_counter()
    run = visiontune.fit(str(data), model="tf_efficientnet_lite0", weights=str(weights), freeze_epochs=1,
                         epochs=1 + unfrozen, probe=False, compile=compiled, threads=threads, workers=0,
                         seed=0, report=False, progress=False, out=str(out))
    wall = time.perf_counter() - started
    with (run.dir / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["stage"] == "unfrozen"]
    return {"compile": compiled, "wall_s": round(wall, 1),
            "unfrozen_train_s": [round(float(row["train_seconds"]), 2) for row in rows],
            "val_accuracy": [round(float(row["val_accuracy"]), 4) for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    parser.add_argument("--unfrozen", type=int, default=3, help="Unfrozen epochs after the frozen one.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=["eager-first", "compiled-first"], default="eager-first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.data.is_dir() or not args.weights.is_file():
        raise SystemExit(f"needs {args.data} and {args.weights}")
    order = [False, True] if args.order == "eager-first" else [True, False]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="visiontune-compile-") as tmp:
        results = [train(args.data, args.weights, Path(tmp) / f"run-{i}", compiled, args.unfrozen, args.threads)
                   for i, compiled in enumerate(order)]
    eager, compiled = sorted(results, key=lambda r: r["compile"])
    steady = [e / c for e, c in zip(eager["unfrozen_train_s"][1:], compiled["unfrozen_train_s"][1:])]
    report = {"results": results, "order": args.order, "threads": args.threads,
              "steady_speedup_per_epoch": [round(s, 3) for s in steady],
              "compile_overhead_s": round(compiled["unfrozen_train_s"][0] - eager["unfrozen_train_s"][0], 1),
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "machine": machine()}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
