"""Issue 16: captioning generated scenes, grid + attention vs pooled features, measured.

Data: `visiontune caption scenes` (seeded): 2,000 train, 300 val, 300 test images of 1-3 coloured
shapes, three true captions each. Encoder: the shared tf_efficientnet_lite0 ImageNet weights
(../shared/weights), frozen, 224 px, features cached once per run; one run with a random-init
encoder instead. Each run keeps the epoch with the best validation CIDEr-D; the test split is
scored once, by the kept model, with beam search (width 3).

Per setting: test BLEU-4 and CIDEr-D (pycocoevalcap) with 95% bootstrap CIs, relation accuracy on
the two-shape test images (the generated caption names both shapes and the relation that holds
between them, `visiontune.caption.scenes.relation_correct`) with its CI, training wall time
(encoding included) and captions/s of `predict` on the 300 test image files (encoding included).
Targets: grid + Transformer BLEU-4 >= 0.8; grid beats pooled on relation accuracy with
non-overlapping CIs; training under 15 minutes on 2 CPU cores; pretrained beats random init.

    python benchmarks/caption_scenes.py [--shared ../shared] [--out runs/caption-scenes] [--epochs 12]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np

from visiontune import caption
from visiontune.bench.benchmark import machine
from visiontune.caption.metrics import share_with_ci
from visiontune.caption.scenes import load_scenes, relation_correct

SETTINGS = {  # name: options of caption.fit
    "grid + transformer": dict(features="grid", decoder="transformer"),
    "pooled + transformer": dict(features="pooled", decoder="transformer"),
    "grid + lstm attention": dict(features="grid", decoder="lstm"),
    "grid + transformer, random-init encoder": dict(features="grid", decoder="transformer", pretrained=False),
}


def relation_accuracy(run_dir: Path, data: Path, axis_only: bool = False) -> dict:
    """Share of two-shape test images whose caption states the true relation (or its axis)."""
    scenes = load_scenes(data)
    outcomes = []
    with open(run_dir / "eval" / "test" / "captions.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            shapes = scenes[str(Path(row["image"]).relative_to(data.resolve()))]
            if len(shapes) == 2:
                outcomes.append(relation_correct(row["caption"], shapes, axis_only=axis_only))
    return share_with_ci(np.array(outcomes, dtype=float))


def run_dir_of(out: Path, name: str) -> Path:
    return out / name.replace(" ", "").replace(",", "-").replace("+", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("runs/caption-scenes"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="Setting names to run (default: all).")
    parser.add_argument("--rescore", action="store_true",
                        help="Recompute the relation accuracies of finished runs from their eval/test/captions.csv.")
    args = parser.parse_args()
    weights = args.shared / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
    data = args.out / "data"
    if not (data / "captions.csv").is_file():
        caption.make_scenes(data, {"train": 2000, "val": 300, "test": 300}, image_size=128, seed=0)
    results = {"machine": machine(), "epochs": args.epochs, "width": args.width, "settings": {}}
    result_file = Path(__file__).parent / "results" / "caption_scenes_cpu.json"
    if result_file.is_file():
        results["settings"] = json.loads(result_file.read_text()).get("settings", {})
    test_images = sorted(str(p) for p in (data / "images").glob("test_*.png"))
    for name, options in SETTINGS.items():
        if args.rescore and name in results["settings"]:
            row = results["settings"][name]
            row["relation_accuracy"] = relation_accuracy(run_dir_of(args.out, name), data)
            row["relation_axis_accuracy"] = relation_accuracy(run_dir_of(args.out, name), data, axis_only=True)
            continue
        if args.rescore or (args.only and name not in args.only):
            continue
        run_dir = run_dir_of(args.out, name)
        shutil.rmtree(run_dir, ignore_errors=True)
        pretrained = options.get("pretrained", True)
        run = caption.fit(data / "captions.csv", out=str(run_dir), model="tf_efficientnet_lite0",
                          weights=str(weights) if pretrained else None, epochs=args.epochs, width=args.width,
                          **options)
        summary = json.loads((run_dir / "summary.json").read_text())
        started = time.perf_counter()
        captions, _ = run.predict(test_images, beam=3)
        seconds = time.perf_counter() - started
        results["settings"][name] = {
            "bleu4": summary["test"]["bleu4"], "cider": summary["test"]["cider"],
            "relation_accuracy": relation_accuracy(run_dir, data),
            "relation_axis_accuracy": relation_accuracy(run_dir, data, axis_only=True),
            "train_seconds": summary["train_seconds"],
            "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
            "captions_per_second": len(captions) / seconds, "options": options,
        }
        print(name, json.dumps(results["settings"][name]), flush=True)
        result_file.write_text(json.dumps(results, indent=2))
    result_file.write_text(json.dumps(results, indent=2))
    print("| setting | BLEU-4 [95% CI] | CIDEr-D [95% CI] | relation accuracy [95% CI] | relation axis [95% CI] "
          "| two-shape images | kept / run epochs | train s | captions/s |")
    print("| --- | --- | --- | --- | --- | --: | --- | --: | --: |")
    for name, r in results["settings"].items():
        rel, axis = r["relation_accuracy"], r["relation_axis_accuracy"]
        print(f"| {name} | {r['bleu4']['value']:.3f} [{r['bleu4']['ci95'][0]:.3f}, {r['bleu4']['ci95'][1]:.3f}] | "
              f"{r['cider']['value']:.2f} [{r['cider']['ci95'][0]:.2f}, {r['cider']['ci95'][1]:.2f}] | "
              f"{rel['value']:.3f} [{rel['ci95'][0]:.3f}, {rel['ci95'][1]:.3f}] | "
              f"{axis['value']:.3f} [{axis['ci95'][0]:.3f}, {axis['ci95'][1]:.3f}] | {rel['images']} | "
              f"{r['best_epoch']} / {r['epochs_run']} | {r['train_seconds']:.0f} | {r['captions_per_second']:.1f} |")


if __name__ == "__main__":
    main()
