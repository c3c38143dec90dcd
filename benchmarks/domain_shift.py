"""Issue 15: a photo -> "X-ray-like" domain shift on hymenoptera, measured end to end.

Source: ../shared/data/hymenoptera (train/ for training, val/ for validation), the shared lite0
ImageNet weights. Target: the same kind of photos made X-ray-like (grayscale, inverted,
contrast-stretched, translucent clutter overlaid; seeded per file): target/train from
hymenoptera train/ (used without labels by AdaBN and MCC, with k labels per class by finetune,
all labels by the oracle), target/test from hymenoptera val/ (scoring only, read once at the end).

One table with 95% bootstrap CIs: source val accuracy; target test accuracy of source-only,
AdaBN, MCC, finetune k=5 and k=10, oracle; OOD AUROC (energy, KNN) of target test vs source val;
stress-test accuracies of the source-only model on source val. Targets: AdaBN or MCC recovers at
least half of the source-only -> oracle gap; OOD AUROC >= 0.95; adapt runs in minutes on 2 cores.

    python benchmarks/domain_shift.py [--shared ../shared] [--out runs/domain-shift] [--source RUN] [--no-probe]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

import visiontune
from visiontune.adapt.workflow import adapt
from visiontune.bench.benchmark import machine
from visiontune.data.images import load_rgb

CLUTTER_ALPHA = 0.4


def xray_like(image: Image.Image, seed: int) -> Image.Image:
    """Grayscale, inverted, contrast-stretched, with translucent overlaid clutter (boxes, ellipses, wires)."""
    grey = ImageOps.autocontrast(ImageOps.invert(ImageOps.grayscale(image)), cutoff=2)
    rng = np.random.default_rng(seed)
    clutter = Image.new("L", grey.size, 0)
    draw = ImageDraw.Draw(clutter)
    w, h = grey.size
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.uniform(0.1, 0.4) * w), y0 + int(rng.uniform(0.1, 0.4) * h)
        shade = int(rng.integers(80, 230))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=shade)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=shade)
        else:
            draw.line((x0, y0, x1, y1), fill=shade, width=max(2, w // 60))
    alpha = clutter.point(lambda v: int(255 * CLUTTER_ALPHA) if v else 0)
    return Image.composite(clutter, grey, alpha).convert("RGB")


def build_target(source: Path, out: Path) -> None:
    """out/<class>/<file>.png: every image of source/<class>/ made X-ray-like."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir()):
            image = load_rgb(path, 50_000_000)
            xray_like(image, zlib.crc32(path.name.encode())).save(out / folder.name / f"{path.stem}.png")


def target_accuracy(run_dir: Path, test: Path) -> dict:
    result = visiontune.load_run(run_dir).evaluate(data=str(test))
    row = {"accuracy": result["accuracy"], "ci": result["bootstrap_95ci"]["accuracy"], "n": result["n"]}
    if "ood" in result and "auroc" in result["ood"]:
        row["ood"] = {"auroc": result["ood"]["auroc"], "target_flagged": result["ood"]["flagged_rate"],
                      "source_flagged": result["ood"]["reference_flagged_rate"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--out", default="runs/domain-shift")
    parser.add_argument("--source", help="an existing source run to reuse instead of training one")
    parser.add_argument("--epochs", type=int, default=6, help="source training epochs")
    parser.add_argument("--no-probe", action="store_true",
                        help="train the source without the linear-probe stage, so that the kept model is fine-tuned "
                             "end to end (its BatchNorm statistics are the source's: AdaBN's premise)")
    parser.add_argument("--adapt-epochs", type=int, default=None, help="MCC / finetune epochs [adapt's default]")
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    data, weights = shared / "data/hymenoptera", shared / "weights/tf_efficientnet_lite0.in1k.safetensors"
    if not data.is_dir() or not weights.is_file():
        raise SystemExit(f"needs {data} and {weights}")
    target = out / "target"  # built once; a second --out builds the same images (seeded per file)
    if not (target / "test").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        build_target(data / "train", target / "train")
        build_target(data / "val", target / "test")
    seconds: dict[str, float] = {}

    source = Path(args.source) if args.source else out / "source"
    if not args.source:
        shutil.rmtree(source, ignore_errors=True)
        t0 = time.perf_counter()
        visiontune.fit(data, out=str(source), model="tf_efficientnet_lite0", weights=str(weights), epochs=args.epochs,
                       probe=not args.no_probe)
        seconds["train source"] = time.perf_counter() - t0
    run = visiontune.load_run(source)
    stress = run.evaluate("val", stress=True)["stress"]

    options = {} if args.adapt_epochs is None else {"epochs": args.adapt_epochs}
    variants = {"adabn": {"method": "adabn"}, "mcc": {"method": "mcc", **options}}
    for k in (5, 10):
        variants[f"finetune k={k}"] = {"method": "finetune", "target_labels": target / "train", "shots": k, **options}
    variants["oracle (all target train labels)"] = {"method": "finetune", "target_labels": target / "train", **options}
    adapted: dict[str, Path] = {}
    for name, how in variants.items():
        destination = out / name.split(" (")[0].replace(" ", "-").replace("=", "")
        shutil.rmtree(destination, ignore_errors=True)
        t0 = time.perf_counter()
        adapted[name] = Path(adapt(source, target / "train", out=destination, **how))
        seconds[name] = time.perf_counter() - t0

    # the target test split is read from here on only
    rows = {"source-only": target_accuracy(source, target / "test")}
    rows.update({name: target_accuracy(directory, target / "test") for name, directory in adapted.items()})
    source_val = run.summary["val"]["accuracy"]
    gap = rows["oracle (all target train labels)"]["accuracy"] - rows["source-only"]["accuracy"]
    recovered = {name: (rows[name]["accuracy"] - rows["source-only"]["accuracy"]) / gap if gap > 0 else None
                 for name in ("adabn", "mcc")}
    result = {
        "source_val_accuracy": source_val, "target": rows, "gap_recovered": recovered,
        "ood_auroc_target_vs_source_val": rows["source-only"].get("ood"),
        "stress_source_val": stress["perturbations"], "stress_reading": stress["reading"],
        "seconds": {name: round(value, 1) for name, value in seconds.items()}, "machine": machine(),
    }
    (out / "domain_shift.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| model | target test accuracy [95% CI] | adapt s |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['accuracy']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] | "
              f"{seconds.get(name, 0):.0f} |")


if __name__ == "__main__":
    main()
