"""The lr range test on hymenoptera (tf_efficientnet_lite0), then `--lr auto` vs the default lr.

Both trainings run in this process, one after the other, with the recipe's defaults otherwise.
Prints the machine's load average with every timing. Needs ../shared (weights and data).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import visiontune

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data/hymenoptera"
WEIGHTS = SHARED / "weights/tf_efficientnet_lite0.in1k.safetensors"
OPTIONS = {"model": "tf_efficientnet_lite0", "weights": str(WEIGHTS), "report": False, "progress": False}


def main(out: Path) -> None:
    print("load average before:", os.getloadavg())
    t0 = time.perf_counter()
    found = visiontune.lr_find(DATA, out=out / "lr_find", **OPTIONS)
    seconds = time.perf_counter() - t0
    print(f"lr_find: {seconds:.1f} s, {len(found.lrs)} steps, suggestion {found.suggestion:.3g}, "
          f"min loss / 10 {found.min_loss_lr:.3g}; {'; '.join(found.notes)}; load {os.getloadavg()}")
    results = {"lr_find": {"seconds": seconds, "steps": len(found.lrs), "suggestion": found.suggestion,
                           "min_loss_lr": found.min_loss_lr}}
    for name, lr in (("default", 1e-3), ("auto", "auto")):
        t0 = time.perf_counter()
        run = visiontune.fit(DATA, lr=lr, out=str(out / name), **OPTIONS)
        seconds = time.perf_counter() - t0
        summary = run.summary
        best = summary["best_epoch"]
        results[name] = {"lr": run.config.lr, "best_epoch": best, "val_accuracy": summary["val"]["accuracy"],
                         "wall_s": seconds, "load": os.getloadavg()}
        print(f"{name}: lr {run.config.lr:.3g}, best epoch {best}, val accuracy {summary['val']['accuracy']:.3f}, "
              f"{seconds:.1f} s wall; load {os.getloadavg()}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-lr-find"))
