"""Issue 17: detection on generated tiles (cracks and blobs), Faster R-CNN and the R-CNN region
pipeline, measured with the same split, threshold rule and evaluation.

Data: `visiontune detect tiles` (seeded): 500 tiles of 512 px, split by image 300 train / 100 val
/ 100 test (workflow.fit's seeded 0.2 / 0.2 split). Faster R-CNN: the timm-fpn default on the
shared tf_efficientnet_lite0 ImageNet weights (../shared/weights), the tiles resized to
`--min-size` px inside the network (smaller than 512 on CPU), training time-boxed by
`--time-limit` seconds (the epoch in progress stops, is validated, and the best epoch is kept).
The R-CNN rows (classifier only, + SVM, + box regression) share one `regions` set (selective
search `fast` on each tile scaled to `--search-side` px, 96-px crops) and one region classifier
(lite0 fine-tuned on it, focal loss, balanced sampler), then call workflow.fit(method="rcnn")
three times. `proposal_recall` reports how many true boxes the proposals reach at IoU 0.5.

Per row: test mAP@0.5 with its 95% bootstrap CI, mAP@[.5:.95], recall and precision at the score
threshold chosen on validation for recall 0.9, fit time (wall), images/s of evaluation (decode
included); then `speed` re-times every row's run on the test files in one process, interleaved.

    python benchmarks/detect_synthetic.py [--shared ../shared] [--out runs/detect-synthetic]
        [--min-size 256] [--epochs 4] [--time-limit 1200] [--skip-faster-rcnn] [--speed-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

import visiontune
from visiontune.bench.benchmark import machine
from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import load_rgb
from visiontune.detect import make_tiles, workflow
from visiontune.detect.annotations import load_annotations
from visiontune.detect.evaluation import average_precision_50, match_all
from visiontune.detect.faster_rcnn import FasterRCNNOptions
from visiontune.detect.labelling import reached
from visiontune.detect.proposals import ProposalCache
from visiontune.detect.rcnn import RCNNOptions
from visiontune.detect.regions import regions
from visiontune.detect.run import DetectorRun, detect_files

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
    ratios = tuple(float(r) for r in args.anchor_ratios.split(","))
    options = FasterRCNNOptions(weights=str(weights), min_size=args.min_size, max_size=args.min_size,
                                epochs=args.epochs, time_limit_s=args.time_limit, seed=SEED, device="cpu",
                                anchor_ratios=ratios)
    default = ratios == FasterRCNNOptions().anchor_ratios
    name = f"Faster R-CNN, lite0 FPN, {args.min_size} px" + ("" if default else f", anchor ratios {args.anchor_ratios}")
    run_dir = out / ("faster-rcnn" if default and args.min_size == 256 else
                     f"faster-rcnn-{args.min_size}px-ratios-{args.anchor_ratios.replace(',', '-')}")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    run = workflow.fit(coco, coco.parent / "images", run_dir, method="faster-rcnn",
                       target_recall=TARGET_RECALL, seed=SEED, faster_rcnn=options)
    return row(name, run, started) | {"options": options.model_dump(mode="json")}


def region_set(coco: Path, out: Path, args) -> dict:
    """`regions` on the tiles (the detector's split: fractions 0.2 / 0.2, seed 0), timed, with the
    process's peak RSS after it (it runs first, so the peak is its own)."""
    if (out / "regions").exists():
        shutil.rmtree(out / "regions")
    started = time.perf_counter()
    summary = regions(coco.parent / "images", coco, out / "regions", proposals=args.proposals,
                      max_proposals=args.max_proposals, search_side=args.search_side,
                      max_negatives=args.max_negatives, size=args.crop_size, seed=SEED, val_fraction=0.2,
                      test_fraction=0.2, progress=False)
    return {"seconds": time.perf_counter() - started,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "regions": summary["regions"], "regions_per_split": summary["regions_per_split"],
            "images_per_split": summary["images_per_split"], "options": summary["options"]}


def proposal_recall(coco: Path, out: Path, args) -> dict:
    """Share of the true boxes that some proposal overlaps at IoU >= 0.5, per class, over all 500
    tiles (`regions.json` has it for the split ones too), from the proposals `regions` cached: the
    same ones every R-CNN row uses (proposals depend on nothing but the image)."""
    dataset = load_annotations(coco, coco.parent / "images")
    cache = ProposalCache(out / "regions" / "proposals", args.proposals, args.max_proposals, args.search_side)
    found, total, counts = Counter(), Counter(), []
    for targets in dataset.images:
        proposals = cache.proposals(targets.path, np.asarray(load_rgb(targets.path, DEFAULT_MAX_PIXELS)))
        counts.append(len(proposals))
        for label, hit in zip(targets.labels, reached(proposals, targets)):
            total[dataset.classes[label]] += 1
            found[dataset.classes[label]] += int(hit)
    return {"recall_at_iou_0.5": {name: found[name] / total[name] for name in sorted(total)},
            "recall_all": sum(found.values()) / max(1, sum(total.values())), "boxes": dict(total),
            "mean_proposals": float(np.mean(counts)), "cache": {"hits": cache.hits, "misses": cache.misses}}


def region_classifier(out: Path, weights: Path, args) -> tuple[Path, float]:
    """The README's R-CNN recipe: lite0 fine-tuned on regions.csv (focal loss, balanced sampler)."""
    run_dir = out / "region-classifier"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    run = visiontune.fit(str(out / "regions" / "regions.csv"), model="tf_efficientnet_lite0", weights=str(weights),
                         image_size=args.crop_size, epochs=args.region_epochs, loss="focal", balance="sampler",
                         seed=SEED, device="cpu", report=False, out=str(run_dir), progress=False)
    return Path(run.dir), time.perf_counter() - started


def split_by_image(path: Path, image_column: str) -> dict[str, str]:
    with path.open(newline="") as handle:
        return {str(Path(r[image_column]).resolve()): r["split"] for r in csv.DictReader(handle)}


def rcnn_rows(coco: Path, out: Path, args, classifier: Path, stages: dict) -> list[dict]:
    """The three R-CNN rows on one region classifier; each row's `pipeline_fit_seconds` adds the
    regions and classifier time (paid once, shared by the three) to its own fit."""
    variants = [("R-CNN, classifier only", False, False), ("R-CNN + SVM", True, False),
                ("R-CNN + SVM + box regression", True, True)]
    rows = []
    regions_split = split_by_image(out / "regions" / "regions.csv", "image")
    for name, svm, box_regression in variants:
        run_dir = out / name.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        options = RCNNOptions(classifier_run=classifier, proposals=args.proposals, max_proposals=args.max_proposals,
                              search_side=args.search_side, svm=svm, box_regression=box_regression, seed=SEED, device="cpu")
        started = time.perf_counter()
        run = workflow.fit(coco, coco.parent / "images", run_dir, method="rcnn", target_recall=TARGET_RECALL,
                           seed=SEED, rcnn=options)
        result = row(name, run, started)
        detector_split = split_by_image(run.dir / "splits.csv", "image")
        result |= {"options": options.model_dump(mode="json"), "rcnn_fit": json.loads((run.dir / "rcnn_fit.json").read_text()),
                   "split_equals_regions_csv": detector_split == regions_split,
                   "pipeline_fit_seconds": stages["regions"]["seconds"] + stages["classifier_seconds"] + result["fit_seconds"]}
        rows.append(result)
    return rows


def speed(rows: list[dict], rounds: int) -> dict:
    """Images/s of every run on its 100 test files, timed again in this one process, the runs
    interleaved round by round (best round kept), so the ratios compare like with like: the same
    load, the same decode (`detect_files`, as `evaluate`). Each detector is loaded and warmed on two
    images first. The last round's detections give the paired differences (`paired`)."""
    runs = {r["name"]: DetectorRun(r["run"]) for r in rows}
    targets = {name: run.split_targets("test") for name, run in runs.items()}
    for name, run in runs.items():
        detect_files(run.detector, [t.path for t in targets[name][:2]])
    best, found = dict.fromkeys(runs, 0.0), {}
    for _ in range(rounds):
        for name, run in runs.items():
            kept, found[name], _, seconds = detect_files(run.detector, [t.path for t in targets[name]])
            best[name] = max(best[name], len(kept) / seconds)
    return {"rounds": rounds, "images": {name: len(t) for name, t in targets.items()}, "images_per_second": best,
            "load_average": list(os.getloadavg()), "paired": paired(runs, targets, found)}


PAIRS = [("R-CNN + SVM", "R-CNN, classifier only"), ("R-CNN + SVM + box regression", "R-CNN + SVM")]


def paired(runs: dict, targets: dict, found: dict, resamples: int = 1000) -> list[dict]:
    """Paired bootstrap of each R-CNN step and of each Faster R-CNN row against the full R-CNN:
    the same resampled test images score both rows (greedy matching at IoU 0.5 for AP@0.5, and at
    0.5:0.95 for the COCO mAP), 95% percentile interval of the difference; every box the runs
    return counts, as in `evaluate`'s AP (the threshold only sets recall and precision)."""
    full = "R-CNN + SVM + box regression"
    pairs = PAIRS + [(name, full) for name in runs if name.startswith("Faster")]
    pairs = [(a, b) for a, b in pairs if a in runs and b in runs]
    if any(str(t.path) != str(u.path) for a, b in pairs for t, u in zip(targets[a], targets[b])):
        raise SystemExit("the runs' test splits differ: paired differences need the same images")
    ious = np.linspace(0.5, 0.95, 10)
    classes = len(next(iter(runs.values())).classes)
    matched = {name: [match_all(found[name], targets[name], classes, iou) for iou in ious] for name in runs}

    def scores(name: str, index: np.ndarray) -> tuple[float, float]:
        at = [average_precision_50([per_iou[i] for i in index], classes)[0] for per_iou in matched[name]]
        return at[0], float(np.mean(at))

    rng = np.random.default_rng(SEED)
    n = len(next(iter(targets.values())))
    draws = [rng.integers(0, n, n) for _ in range(resamples)]
    out = []
    for a, b in pairs:
        everything = np.arange(n)
        point = np.subtract(scores(a, everything), scores(b, everything))
        deltas = np.array([np.subtract(scores(a, d), scores(b, d)) for d in draws])
        low, high = np.percentile(deltas, [2.5, 97.5], axis=0)
        out.append({"row": a, "minus": b, "map_50_difference": float(point[0]),
                    "map_50_ci95": [float(low[0]), float(high[0])], "map_difference": float(point[1]),
                    "map_ci95": [float(low[1]), float(high[1])]})
        print(f"{a} - {b}: mAP@0.5 {point[0]:+.3f} [{low[0]:+.3f}, {high[0]:+.3f}], "
              f"mAP@[.5:.95] {point[1]:+.3f} [{low[1]:+.3f}, {high[1]:+.3f}]", flush=True)
    return out


def tiles(out: Path, n_tiles: int) -> Path:
    """The seeded tiles, reused when a previous run left all of them (make_tiles is deterministic)."""
    coco = out / "tiles" / "annotations.json"
    if coco.is_file() and len(json.loads(coco.read_text())["images"]) == n_tiles and \
            len(list((out / "tiles" / "images").glob("*.png"))) == n_tiles:
        return coco
    return make_tiles(out / "tiles", n_tiles, size=TILE_SIZE, seed=SEED)


def merged(rows: list[dict]) -> list[dict]:
    """The stored rows with these replacing those of the same name (a partial run keeps the others)."""
    stored = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    names = {r["name"] for r in rows}
    return [r for r in stored if r["name"] not in names] + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("runs/detect-synthetic"))
    parser.add_argument("--tiles", type=int, default=TILES, help="Fewer for a dry run (results then stay in --out).")
    parser.add_argument("--min-size", type=int, default=256, help="Network input side (tiles are 512 px).")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=1200.0, help="Seconds of Faster R-CNN training at most.")
    parser.add_argument("--anchor-ratios", default="0.5,1,2", help="Faster R-CNN anchors' height / width ratios.")
    parser.add_argument("--proposals", default="fast", help="R-CNN proposals: sliding, fast or quality.")
    parser.add_argument("--max-proposals", type=int, default=2000)
    parser.add_argument("--search-side", type=int, default=256, help="Selective search's longer image side.")
    parser.add_argument("--max-negatives", type=int, default=16, help="Background crops per image for the classifier.")
    parser.add_argument("--crop-size", type=int, default=96, help="R-CNN region crop side (classifier input).")
    parser.add_argument("--region-epochs", type=int, default=3, help="Epochs of the region classifier.")
    parser.add_argument("--skip-faster-rcnn", action="store_true")
    parser.add_argument("--skip-rcnn", action="store_true")
    parser.add_argument("--speed-rounds", type=int, default=2,
                        help="Rounds of the same-process speed comparison of every row's run (0: none).")
    parser.add_argument("--speed-only", action="store_true",
                        help="Only re-time the stored rows' runs (the results file's), fitting nothing.")
    args = parser.parse_args()
    weights = args.shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    full = args.tiles == TILES
    path = RESULTS if full else args.out / "results.json"
    if args.speed_only:
        result = json.loads(path.read_text())
        result["speed"] = speed(result["rows"], args.speed_rounds)
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["speed"], indent=2))
        return
    coco = tiles(args.out, args.tiles)
    stages: dict = {}
    if not args.skip_rcnn:  # regions first, so that the peak RSS measured after it is its own
        stages["regions"] = region_set(coco, args.out, args)
        print(f"regions: {stages['regions']['seconds']:.0f} s, peak RSS {stages['regions']['peak_rss_mib']:.0f} MiB, "
              f"{stages['regions']['regions_per_split']}", flush=True)
        stages["proposal_recall"] = proposal_recall(coco, args.out, args)
        print(f"proposals: {stages['proposal_recall']}", flush=True)
        classifier, stages["classifier_seconds"] = region_classifier(args.out, weights, args)
        print(f"region classifier: {stages['classifier_seconds']:.0f} s", flush=True)
    rows = []
    if not args.skip_faster_rcnn:
        rows.append(faster_rcnn_row(coco, args.out, weights, args))
    if not args.skip_rcnn:
        rows += rcnn_rows(coco, args.out, args, classifier, stages)
    stored = json.loads(RESULTS.read_text()) if full and RESULTS.is_file() else {}
    result = {"machine": machine(), "tiles": args.tiles, "tile_size": TILE_SIZE, "seed": SEED,
              "target_recall": TARGET_RECALL, "rows": merged(rows) if full else rows,
              "rcnn_stages": stages or stored.get("rcnn_stages")}
    if args.speed_rounds:
        result["speed"] = speed(result["rows"], args.speed_rounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"{'row':44s} {'mAP@0.5 [95% CI]':24s} {'mAP':>6s} {'recall@t':>8s} {'fit s':>7s} {'img/s':>6s}")
    for r in result["rows"]:
        low, high = r["map_50_ci95"]
        print(f"{r['name']:44s} {r['map_50']:.3f} [{low:.3f}, {high:.3f}]     {r['map']:6.3f} "
              f"{r['recall_at_threshold']:8.3f} {r['fit_seconds']:7.0f} {r['images_per_second']:6.2f}")


if __name__ == "__main__":
    main()
