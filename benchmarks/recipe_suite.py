"""Issue 11: the default recipe against its own linear probe and the usual alternatives, one table.

For each dataset, one seeded split is written once (OUT/<dataset>/splits.csv) and every method
trains on its train part, selects on its val part and predicts its test part once:

- visiontune: `visiontune train SPLITS --model M --weights W` with every other option at its default;
- probe: `visiontune probe SPLITS --model M --weights W --classifier logreg`;
- tutorial: the PyTorch transfer-learning tutorial's recipe (benchmarks/baselines/tutorial_finetune.py);
- fastai: `vision_learner(...).fine_tune(EPOCHS - 1)` in its own venv (benchmarks/baselines/fastai_finetune.py),
  so the same number of passes over the data as visiontune's default.

Test accuracy and macro-F1 with 95% bootstrap intervals, the recall of the rarest training class
and the wall time are computed the same way for every method from its test probabilities.
Datasets: hymenoptera (train/ as given, val/ halved by a seeded stratified split into val and
test), the magnetic-tile half (80/10/10, seeded) and a synthetic imbalanced texture-defect set
(benchmarks/synthetic_textures.py, 80/10/10). Uses ../shared (not part of the repo).

    python benchmarks/recipe_suite.py [--shared ../shared] [--out runs/recipe-suite] [--datasets ...]
        [--methods visiontune,probe,tutorial,fastai] [--epochs 6]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import visiontune
from visiontune.data.samples import Sample
from visiontune.data.sources import discover
from visiontune.data.splits import write_splits_csv
from visiontune.evaluation import metrics
from visiontune.features.probes import probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_textures import make_dataset  # noqa: E402

MODEL = "tf_efficientnet_lite0"
BASELINES = Path(__file__).resolve().parent / "baselines"
METHODS = ("visiontune", "probe", "tutorial", "fastai")


def write_split(name: str, data: Path, out: Path, seed: int) -> Path:
    """OUT/splits.csv for `data`; hymenoptera's val/ folder is halved into val and test."""
    out.mkdir(parents=True, exist_ok=True)
    if name == "magnetic-tile":  # the same-name .png files are pixel masks, not images: list the .jpg only
        listed = discover(data, split=False).samples
        data = out / "images.csv"
        with data.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows((s.path, s.label) for s in listed if s.path.lower().endswith(".jpg"))
    samples = discover(data, None, 0.1, 0.1, seed).samples
    if name == "hymenoptera":
        rng = np.random.default_rng(seed)
        val = [s for s in samples if s.split == "val"]
        halves = []
        for label in sorted({s.label for s in val}):
            of_label = [s for s in val if s.label == label]
            halves += [Sample(s.path, s.label, "test" if i % 2 else "val")
                       for i, s in enumerate(of_label[j] for j in rng.permutation(len(of_label)))]
        samples = [s for s in samples if s.split == "train"] + halves
    write_splits_csv(samples, out / "splits.csv")
    return out / "splits.csv"


def scores(y_true: np.ndarray, probs: np.ndarray, labels: list[str], rarest: str) -> dict:
    result = metrics.prediction_metrics(y_true, probs, labels)
    return {"n": result["n"], "accuracy": result["accuracy"], "f1_macro": result["f1_macro"],
            "ci": result["bootstrap_95ci"], "rarest_recall": result["per_class"][rarest]["recall"],
            "rarest_support": result["per_class"][rarest]["support"]}


def read_predictions(path: Path, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    y_true = np.array([labels.index(row["actual"]) for row in rows])
    return y_true, np.array([[float(row[f"p_{label}"]) for label in labels] for row in rows])


def run_visiontune(splits: Path, weights: Path, out: Path, threads: int | None) -> dict:
    started = time.perf_counter()
    run = visiontune.fit(splits, model=MODEL, weights=str(weights), out=str(out / "visiontune"), report=False,
                         progress=False, threads=threads)
    wall = time.perf_counter() - started
    run.evaluate("test")  # the best-on-validation model, scored on test once
    labels = run.summary["labels"]
    y_true, probs = read_predictions(run.dir / "eval" / "test" / "predictions.csv", labels)
    return {"wall_s": wall, "y_true": y_true, "probs": probs, "labels": labels,
            "kept": run.summary["kept"], "best_epoch": run.summary["best_epoch"],
            "val": run.summary["val"], "probe_val": run.summary["probe"]}


def run_probe(splits: Path, weights: Path, out: Path, threads: int | None) -> dict:
    started = time.perf_counter()
    summary = probe(splits, model=MODEL, weights=weights, classifier="logreg", out=out / "probe", threads=threads)
    wall = time.perf_counter() - started
    y_true, probs = read_predictions(out / "probe" / "test" / "predictions.csv", summary["labels"])
    return {"wall_s": wall, "y_true": y_true, "probs": probs, "labels": summary["labels"],
            "val": summary["val"], "chosen": summary["chosen"]}


def run_script(python: str, script: str, splits: Path, weights: Path, out: Path, epochs: int,
               threads: int | None) -> dict:
    target = out / f"{Path(script).stem}.json"
    command = [python, str(BASELINES / script), "--splits", str(splits), "--model", MODEL, "--weights", str(weights),
               "--epochs", str(epochs), "--out", str(target)] + (["--threads", str(threads)] if threads else [])
    subprocess.run(command, check=True)
    result = json.loads(target.read_text())
    return {"wall_s": result["wall_s"], "y_true": np.array(result["test"]["y_true"]),
            "probs": np.array(result["test"]["probs"]), "labels": result["labels"],
            "val_accuracy_per_epoch": result["val_accuracy_per_epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--out", default="runs/recipe-suite")
    parser.add_argument("--datasets", default="hymenoptera,magnetic-tile,synthetic")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=6, help="Passes over the data for the baselines "
                        "(fastai: 1 frozen + EPOCHS-1); visiontune and the probe use their defaults.")
    parser.add_argument("--fastai-python", default="/tmp/fastai-venv/bin/python")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    weights = shared / "weights/tf_efficientnet_lite0.in1k.safetensors"
    sources = {"hymenoptera": shared / "data/hymenoptera", "magnetic-tile": shared / "data/magnetic-tile"}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.datasets.split(","):
        data = sources.get(name) or make_dataset(out / "synthetic-data", seed=args.seed)
        splits = write_split(name, data, out / name, args.seed)
        train_counts: dict[str, int] = {}
        with splits.open() as handle:
            for row in csv.DictReader(handle):
                if row["split"] == "train":
                    train_counts[row["label"]] = train_counts.get(row["label"], 0) + 1
        rarest = min(train_counts, key=train_counts.get)
        for method in args.methods.split(","):
            print(f"== {name}: {method}", flush=True)
            if method == "visiontune":
                raw = run_visiontune(splits, weights, out / name, args.threads)
            elif method == "probe":
                raw = run_probe(splits, weights, out / name, args.threads)
            elif method == "tutorial":
                raw = run_script(sys.executable, "tutorial_finetune.py", splits, weights, out / name, args.epochs,
                                 args.threads)
            else:
                raw = run_script(args.fastai_python, "fastai_finetune.py", splits, weights, out / name,
                                 args.epochs - 1, args.threads)
            entry = {**scores(raw.pop("y_true"), raw.pop("probs"), raw["labels"], rarest), **raw,
                     "rarest_class": rarest}
            results.setdefault(name, {})[method] = entry
            results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                  f"torch {torch.__version__}")
            results_path.write_text(json.dumps(results, indent=2, default=float))
            print(f"   test acc {entry['accuracy']:.3f} macro-F1 {entry['f1_macro']:.3f} "
                  f"rarest ({rarest}) recall {entry['rarest_recall']:.2f} wall {entry['wall_s']:.0f} s", flush=True)
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| dataset | method | test accuracy [95% CI] | test macro-F1 [95% CI] | rarest-class recall | wall (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, by_method in results.items():
        if name == "machine":
            continue
        for method, r in by_method.items():
            acc, f1 = r["ci"]["accuracy"], r["ci"]["f1_macro"]
            note = f" (kept: {r['kept']})" if "kept" in r else ""
            lines.append(
                f"| {name} | {method}{note} | {r['accuracy']:.3f} [{acc[0]:.3f}, {acc[1]:.3f}] | "
                f"{r['f1_macro']:.3f} [{f1[0]:.3f}, {f1[1]:.3f}] | {r['rarest_recall']:.2f} "
                f"({r['rarest_class']}, n={r['rarest_support']}) | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
