"""Issue 11: choose the recipe's defaults by measurement, on validation only, across datasets.

Runs `visiontune.fit` for a list of recipe variants (each a change from a base) on every dataset
given, several runs at a time, and writes one JSON line per run: the variant, the dataset, the
per-epoch validation accuracy / macro-F1, which model was kept (probe or fine-tuned) and its
validation scores, and the wall time. Test scores are never read (the split keeps its test part
so that it is the suite's split; `report` is off). Meant for a GPU machine, where a variant costs
seconds; the 2-core numbers come from recipe_suite.py.

    python benchmarks/recipe_grid.py --data hymenoptera=DIR --data magnetic-tile=DIR --weights W \
        --out grid.jsonl [--parallel 4] [--deadline-s 420] [--device cuda]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MODEL = "tf_efficientnet_lite0"
OLD_DEFAULT = dict(probe=False, freeze_epochs=1, bn="batch", lr=1e-3, augment="light")
BASE = dict(probe=True, freeze_epochs=0, bn="inference", lr=3e-4, augment="light")
# (name, changes from BASE); first the most informative, since a deadline may cut the list
VARIANTS = [
    ("old-default", OLD_DEFAULT),
    ("base", {}),
    ("bn-batch", dict(bn="batch")),
    ("texture-squash", dict(augment="texture", crop_mode="squash")),
    ("lr1e-3", dict(lr=1e-3)),
    ("lr1e-4", dict(lr=1e-4)),
    ("texture", dict(augment="texture")),
    ("squash", dict(crop_mode="squash")),
    ("texture-squash-bn-batch", dict(augment="texture", crop_mode="squash", bn="batch")),
    ("texture-squash-lr1e-3", dict(augment="texture", crop_mode="squash", lr=1e-3)),
    ("texture-squash-lr1e-4", dict(augment="texture", crop_mode="squash", lr=1e-4)),
    ("crop0.8", dict(crop_scale=0.8)),
    ("lr-mult3", dict(lr_mult=3.0)),
    ("no-probe-freeze1", dict(probe=False, freeze_epochs=1)),
    ("probe-sampler", dict(balance="sampler")),
    ("old-default-sampler", {**OLD_DEFAULT, "balance": "sampler"}),
]


def run_one(job: dict) -> dict:
    import visiontune  # in the worker: each process has its own torch threads

    out = Path(tempfile.mkdtemp(prefix="grid-"))
    options = dict(model=MODEL, weights=job["weights"], epochs=job["epochs"], seed=job["seed"], report=False,
                   progress=False, device=job["device"], workers=job["workers"], threads=job["threads"],
                   **job["options"])
    started = time.perf_counter()
    try:
        run = visiontune.fit(job["data"], out=str(out / "run"), **options)
    except Exception as exc:  # one broken variant must not end the grid
        return {**job, "error": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - started
    with (run.dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    summary = run.summary
    result = {
        "dataset": job["dataset"], "variant": job["variant"], "seed": job["seed"], "options": job["options"],
        "val_accuracy": [round(float(r["val_accuracy"]), 4) for r in rows],
        "val_f1_macro": [round(float(r["val_f1_macro"]), 4) for r in rows],
        "stages": [r["stage"] for r in rows],
        "kept": summary.get("kept"), "best_epoch": summary["best_epoch"],
        "best_val": summary["val"], "probe_val": summary.get("probe"), "wall_s": round(wall, 1),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=DIR (repeat)")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default="", help="Comma-separated names (default: all).")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deadline-s", type=float, default=420)
    args = parser.parse_args()
    chosen = set(filter(None, args.variants.split(",")))
    jobs = [
        {"dataset": name, "data": path, "variant": variant, "options": {**BASE, **changes}, "seed": int(seed),
         "weights": args.weights, "epochs": args.epochs, "device": args.device, "workers": args.workers,
         "threads": args.threads}
        for variant, changes in VARIANTS if not chosen or variant in chosen
        for seed in args.seeds.split(",")
        for name, path in (item.split("=", 1) for item in args.data)
    ]
    started = time.perf_counter()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as sink, futures.ProcessPoolExecutor(args.parallel) as pool:
        pending = set()
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < args.parallel and time.perf_counter() - started < args.deadline_s:
                pending.add(pool.submit(run_one, queue.pop(0)))
            if not pending:
                break
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for future in done:
                result = future.result()
                sink.write(json.dumps(result) + "\n")
                sink.flush()
                print(result.get("dataset"), result.get("variant"), result.get("kept"),
                      result.get("best_val") or result.get("error"), flush=True)
    print(f"{len(jobs) - len(queue)} of {len(jobs)} runs in {time.perf_counter() - started:.0f} s; {len(queue)} cut by the deadline")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
