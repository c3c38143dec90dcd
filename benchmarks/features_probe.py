"""`visiontune features` then `visiontune probe --classifier logreg` on hymenoptera (issue 7's target).

    python benchmarks/features_probe.py [--repeat 3] [--json out.json]

Runs exactly the two commands below as subprocesses of the CLI, `--repeat` times each (the first
run of each counts as warm-up for the file cache; the median of all runs is reported with each
run listed), then checks the target: validation accuracy >= 0.90. Features are the pooled last
feature level of tf_efficientnet_lite0 from the shared offline weights; the split is the data's
own train/ and val/ folders (there is no test folder). Prints os.getloadavg() before and after,
since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path("/work/shared")
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
TARGET = 0.90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        feature_file = Path(scratch) / "hymenoptera.safetensors"
        features_cmd = ["features", str(DATA), "--model", "tf_efficientnet_lite0", "--weights", str(WEIGHTS),
                        "--out", str(feature_file)]
        feature_times = [_run(features_cmd) for _ in range(args.repeat)]
        probe_times, summary = [], None
        for i in range(args.repeat):
            probe_dir = Path(scratch) / f"probe-{i}"
            probe_times.append(_run(["probe", str(feature_file), "--classifier", "logreg", "--out", str(probe_dir)]))
            summary = json.loads((probe_dir / "probe.json").read_text())
    load_after = os.getloadavg()
    result = {
        "commands": [f"visiontune {' '.join(features_cmd)}",
                     "visiontune probe FEATURES.safetensors --classifier logreg --out DIR"],
        "val_accuracy": summary["val"]["accuracy"], "val_f1_macro": summary["val"]["f1_macro"],
        "val_accuracy_95ci": summary["val"]["bootstrap_95ci"]["accuracy"], "val_images": summary["val"]["n"],
        "train_images": summary["counts"]["train"], "chosen": summary["chosen"], "candidates": summary["candidates"],
        "dim": summary["dim"], "layers": summary["layers"], "target_met": summary["val"]["accuracy"] >= TARGET,
        "features_wall_s": {"median": statistics.median(feature_times), "runs": feature_times},
        "probe_wall_s": {"median": statistics.median(probe_times), "runs": probe_times},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "loadavg_before": load_before, "loadavg_after": load_after,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["target_met"] else 1)


def _run(command: list[str]) -> float:
    """Wall seconds of one CLI call (process start and imports included, as a user meets it)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "visiontune.cli.main", *command], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return round(time.perf_counter() - started, 2)


if __name__ == "__main__":
    main()
