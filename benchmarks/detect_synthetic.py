"""Issue 17: detection on generated tiles (cracks and blobs), Faster R-CNN and the R-CNN region
pipeline, measured with the same split, threshold rule and evaluation.

Data: `visiontune detect tiles` (seeded): 500 tiles of 512 px, split by image 300 train / 100 val
/ 100 test (workflow.fit's seeded 0.2 / 0.2 split). Faster R-CNN: the timm-fpn default on the
shared tf_efficientnet_lite0 ImageNet weights (../shared/weights), the tiles resized to
`--min-size` px inside the network (smaller than 512 on CPU), training time-boxed by
`--time-limit` seconds (the epoch in progress stops, is validated, and the best epoch is kept).
The R-CNN rows (classifier only, + SVM, + box regression) come from `rcnn_rows`, the hook of the
R-CNN half (branch detect-b), which calls workflow.fit(method="rcnn") three times.

Per row: test mAP@0.5 with its 95% bootstrap CI, mAP@[.5:.95], recall and precision at the score
threshold chosen on validation for recall 0.9, fit time (wall), images/s of evaluation (decode
included).

    python benchmarks/detect_synthetic.py [--shared ../shared] [--out runs/detect-synthetic]
        [--min-size 256] [--epochs 4] [--time-limit 1200] [--classifier RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from visiontune.bench.benchmark import machine
from visiontune.detect import make_tiles, workflow
from visiontune.detect.faster_rcnn import FasterRCNNOptions

TILES, TILE_SIZE, SEED, TARGET_RECALL = 500, 512, 0, 0.9
RESULTS = Path(__file__).parent / "results" / "detect_synthetic_cpu.json"


def row(name: str, run, started: float) -> dict:
    summary = json.loads((run.dir / "summary.json").read_text())
    test = summary["test"]
    return {"name": name, "run": str(run.dir), "map_50": test["map_50"]["value"], "map_50_ci95": test["map_50"]["ci95"],
            "map": test["map"], "per_class_ap_50": {k: v["ap_50"] for k, v in test["per_class"].items()},
            "threshold": summary["threshold"], "recall_at_threshold": test["recall_at_threshold"],
            "precision_at_threshold": test["precision_at_threshold"], "fit_seconds": summary["fit_seconds"],
            "total_seconds": time.perf_counter() - started, "images_per_second": test["images_per_second"],
            "images": summary["images"], "boxes": summary["boxes"], "load_average": list(os.getloadavg())}


def faster_rcnn_row(coco: Path, out: Path, weights: Path, args) -> dict:
    options = FasterRCNNOptions(weights=str(weights), min_size=args.min_size, max_size=args.min_size,
                                epochs=args.epochs, time_limit_s=args.time_limit, seed=SEED, device="cpu")
    started = time.perf_counter()
    run = workflow.fit(coco, coco.parent / "images", out / "faster-rcnn", method="faster-rcnn",
                       target_recall=TARGET_RECALL, seed=SEED, faster_rcnn=options)
    return row(f"Faster R-CNN, lite0 FPN, {args.min_size} px", run, started) | {"options": options.model_dump(mode="json")}


def rcnn_rows(coco: Path, out: Path, args) -> list[dict]:
    """HOOK for the R-CNN half (branch detect-b): the three R-CNN rows, each one call of
    `workflow.fit(coco, coco.parent / "images", out / NAME, method="rcnn", target_recall=TARGET_RECALL,
    seed=SEED, rcnn=RCNNOptions(classifier_run=args.classifier, svm=..., box_regression=...))`
    returned through `row(NAME, run, started)`:
      "R-CNN, classifier only" (svm=False, box_regression=False), "R-CNN + SVM" (svm=True,
      box_regression=False), "R-CNN + SVM + box regression" (svm=True, box_regression=True).
    Not written in this half: no rows until then."""
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("runs/detect-synthetic"))
    parser.add_argument("--min-size", type=int, default=256, help="Network input side (tiles are 512 px).")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=1200.0, help="Seconds of Faster R-CNN training at most.")
    parser.add_argument("--classifier", type=Path, default=None, help="R-CNN: a classifier run fine-tuned on regions.")
    parser.add_argument("--skip-faster-rcnn", action="store_true")
    args = parser.parse_args()
    weights = args.shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    if args.out.exists():
        shutil.rmtree(args.out)
    coco = make_tiles(args.out / "tiles", TILES, size=TILE_SIZE, seed=SEED)
    rows = [] if args.skip_faster_rcnn else [faster_rcnn_row(coco, args.out, weights, args)]
    rows += rcnn_rows(coco, args.out, args)
    result = {"machine": machine(), "tiles": TILES, "tile_size": TILE_SIZE, "seed": SEED,
              "target_recall": TARGET_RECALL, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"{'row':44s} {'mAP@0.5 [95% CI]':24s} {'mAP':>6s} {'recall@t':>8s} {'fit s':>7s} {'img/s':>6s}")
    for r in rows:
        low, high = r["map_50_ci95"]
        print(f"{r['name']:44s} {r['map_50']:.3f} [{low:.3f}, {high:.3f}]     {r['map']:6.3f} "
              f"{r['recall_at_threshold']:8.3f} {r['fit_seconds']:7.0f} {r['images_per_second']:6.2f}")


if __name__ == "__main__":
    main()
