"""`tune` wall time on tiny synthetic data: 8 trials with pruning against 8 without, same run.

    python benchmarks/tune_tiny.py [--repeats 3]

Both searches draw the same parameters (TPE seeded per trial number), so the difference is what
pruning saves. One warm-up search first (imports, first-use costs); medians of the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import TINY_OPTIONS, write_class_folders
from visiontune.tune.search import tune

FIXED = {k: v for k, v in TINY_OPTIONS.items() if k not in ("progress", "batch_size", "freeze_epochs", "augment")}


def search(data: Path, out: Path, prune: bool) -> tuple[float, dict]:
    started = time.perf_counter()
    result = tune(data, trials=8, out=out, prune=prune, progress=False, **FIXED)
    states = [row["state"] for row in result.trials]
    return time.perf_counter() - started, {s: states.count(s) for s in set(states)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_class_folders(root / "data", {"blue": 12, "red": 12})
        search(data, root / "warmup", prune=True)
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.repeats):
            for prune in (True, False):
                seconds, states = search(data, root / f"r{i}-{prune}", prune)
                times[prune].append(seconds)
                print(f"repeat {i} prune={prune}: {seconds:.1f}s {states} load {os.getloadavg()}")
    pruned, full = statistics.median(times[True]), statistics.median(times[False])
    print(f"median 8 trials + final retrain: with pruning {pruned:.1f}s, without {full:.1f}s, ratio {pruned / full:.2f}")
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
