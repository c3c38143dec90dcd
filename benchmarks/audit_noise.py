"""`visiontune audit` on hymenoptera train+val with planted problems (issue 18's targets).

    PYTHONPATH=. python benchmarks/audit_noise.py [--seed 0] [--json benchmarks/results/audit_noise_cpu.json]
    PYTHONPATH=. python benchmarks/audit_noise.py --fine-tune --folds 3 --epochs 3 [--json ...]

Plants, seeded and unseen by the audit: 10% of the labels flipped (a CSV data source with the
wrong labels; no image is touched) and 20 near-duplicates of training images added to val
(resized 0.5-0.9x, cropped 5%, JPEG quality 60-90, written to a scratch folder). Then:

- runs `visiontune audit CSV --model tf_efficientnet_lite0 --weights FILE` once as a CLI
  subprocess at its default settings (wall time includes process start and imports);
- label issues: precision and recall of the flipped images among the flagged ones; the naive
  ranking at the same number of flags: highest loss of the same linear head (standardised
  logistic regression) fitted on all the noisy labels, as "top losses" ranks a model's training fit;
- near-duplicates: how many of the 20 planted pairs are reported (leakage or within a split) and
  how many other pairs are; the similarities of planted pairs and of the most similar other
  pairs (mean-centred cosine, as the audit computes it), from which the default threshold was
  calibrated on seed 0 (features from `visiontune features`); other seeds plant other flips and copies.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visiontune.audit.analysis import normalised
from visiontune.bench.benchmark import machine
from visiontune.features.extraction import extract
from visiontune.features.store import load_features

SHARED = Path("/work/shared")
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
MODEL = "tf_efficientnet_lite0"
FLIP_SHARE, DUPLICATES = 0.10, 20


def planted(scratch: Path, rng: np.random.Generator) -> tuple[Path, set[str], set[frozenset[str]]]:
    """The noisy CSV data source, the flipped paths and the planted (original, copy) pairs."""
    rows = [(str(p), p.parent.name, split) for split in ("train", "val")
            for p in sorted((DATA / split).glob("*/*")) if p.is_file()]
    classes = sorted({label for _, label, _ in rows})
    flipped_rows = rng.choice(len(rows), int(round(FLIP_SHARE * len(rows))), replace=False)
    noisy = list(rows)
    for i in flipped_rows:
        path, label, split = rows[i]
        noisy[i] = (path, next(c for c in classes if c != label), split)
    pairs = set()
    train_rows = [i for i, row in enumerate(rows) if row[2] == "train"]
    for k, i in enumerate(rng.choice(train_rows, DUPLICATES, replace=False)):
        path, label, _ = rows[i]
        copy = scratch / "copies" / f"copy_{k:02d}.jpg"
        copy.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            dx, dy = int(0.05 * w / 2), int(0.05 * h / 2)  # 5% of each side, centred
            image = image.crop((dx, dy, w - dx, h - dy))
            scale = rng.uniform(0.5, 0.9)
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
            image.save(copy, quality=int(rng.integers(60, 91)))
        noisy.append((str(copy), label, "val"))
        pairs.add(frozenset((path, str(copy))))
    source = scratch / "noisy.csv"
    with source.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *noisy])
    return source, {rows[i][0] for i in flipped_rows}, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="Which labels are flipped and which images copied.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fine-tune", action="store_true", help="audit --fine-tune (the recipe per fold).")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, help="With --fine-tune: epochs per fold.")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source, flipped, pairs = planted(scratch, np.random.default_rng(args.seed))
        command = ["audit", str(source), "--model", MODEL, "--weights", str(WEIGHTS), "--folds", str(args.folds)]
        if args.fine_tune:
            command += ["--fine-tune"] + (["--epochs", str(args.epochs)] if args.epochs else [])
        command += ["--out", str(scratch / "audit")]
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "visiontune.cli.main", *command], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall_s = time.perf_counter() - started
        record = json.loads((scratch / "audit" / "findings.json").read_text())
        extract(str(source), out=scratch / "features.npz", model=MODEL, weights=WEIGHTS)
        stored = load_features(scratch / "features.npz")
    findings = record["findings"]
    flagged = [f["path"] for f in findings if f["kind"] == "label_issue"]
    labels, paths = np.asarray(stored["labels"]), [str(p) for p in stored["paths"]]
    features = np.asarray(stored["features"])
    naive = _naive_ranking(features, labels)[:len(flagged)]
    found_pairs = {frozenset((f["path"], f["other_path"])) for f in findings if f["kind"] in ("leakage", "near_duplicate")}
    unit = normalised(features - features.mean(axis=0))
    index = {p: i for i, p in enumerate(paths)}
    planted_similarity = sorted(float(unit[index[a]] @ unit[index[b]]) for a, b in map(tuple, pairs))
    similarity = unit @ unit.T
    planted_index = {frozenset((index[a], index[b])) for a, b in map(tuple, pairs)}
    i, j = np.triu_indices(len(paths), k=1)
    others = sorted((float(similarity[a, b]) for a, b in zip(i, j) if frozenset((a, b)) not in planted_index),
                    reverse=True)[:5]
    result = {
        "command": "visiontune " + " ".join(command[:1] + ["NOISY.csv"] + command[2:-2] + ["--out", "DIR"]),
        "seed": args.seed, "images": record["images"], "flipped": len(flipped), "folds": record["folds"],
        "out_of_fold": record["out_of_fold"], "fold_runs": record["fold_runs"],
        "oof_accuracy": round(record["oof_accuracy"], 4),
        "audit": _precision_recall(flagged, flipped),
        "naive_top_losses": _precision_recall([paths[k] for k in naive], flipped),
        "noise_rates": record["noise_rates"],
        "duplicates": {"planted": len(pairs), "found": len(found_pairs & pairs), "false_pairs": len(found_pairs - pairs),
                       "threshold": record["settings"]["duplicate_similarity"],
                       "planted_similarity_min_median": [round(planted_similarity[0], 4),
                                                         round(float(np.median(planted_similarity)), 4)],
                       "top_other_similarities": [round(s, 4) for s in others]},
        "outliers": record["counts"]["outlier"],
        "wall_s": round(wall_s, 1), "audit_timings": record["timings"],
        "machine": machine(), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _naive_ranking(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows by decreasing loss of a linear head fitted on all rows (its own training fit)."""
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(features, labels)
    probs = head.predict_proba(features)
    return np.argsort(np.log(probs[np.arange(len(labels)), labels]), kind="stable")


def _precision_recall(flagged: list[str], flipped: set[str]) -> dict:
    hits = len(set(flagged) & flipped)
    return {"flagged": len(flagged), "flipped_among_flagged": hits,
            "precision": round(hits / len(flagged), 4) if flagged else None, "recall": round(hits / len(flipped), 4)}


if __name__ == "__main__":
    main()
