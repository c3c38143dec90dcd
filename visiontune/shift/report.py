"""`visiontune shift`: how images from another domain (a new camera, a scanner, X-ray instead of
photo) differ, for a run's model, from the run's own held-out images; RUN/shift/<name>/ holds
report.html, shift.json, the embedding figure and the Grad-CAM overlays.

The source is the run's test split, else its validation split, never its training images: the
KNN scorer's bank is made of those, so they would look closer than any new image and inflate the
AUROC. Everything is written into a hidden folder that replaces RUN/shift/<name> only once
complete, so a failure leaves the previous report (or none), never half of a new one.
"""

from __future__ import annotations

import functools
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_ood.detector import EnergyBased

from visiontune.data.sources import discover, list_image_files
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.evaluation.plots import embedding_png
from visiontune.explain.explainer import explain
from visiontune.inference.engine import load_for_inference, plan_inference
from visiontune.io import write_text_atomic
from visiontune.models.classifier_run import ClassifierRun
from visiontune.ood.detector import PRIMARY, OODDetector
from visiontune.ood.fit import Extracted, extract, load_ood
from visiontune.reporting.html import render_page
from visiontune.shift import analysis as a

SOURCE_SPLITS = ("test", "val")
EMBEDDED_PER_DOMAIN = 1000
PAIRS = 4
SHIFT_DIR, REPORT_FILE, RESULT_FILE, EMBEDDING_FILE, GRADCAM_DIR = (
    "shift", "report.html", "shift.json", "embedding.png", "gradcam")
NO_KNN_NOTE = ("Energy only: the run has no fitted OOD scorers, so there is no KNN score and no flag "
               "(fit them with `visiontune ood fit {run}`).")


@dataclass
class Domain:
    """The readable images of one domain with the model's outputs and their OOD scores."""

    extracted: Extracted
    true: np.ndarray  # class index, or analysis.UNLABELLED
    scores: dict[str, np.ndarray]
    skipped: list[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.extracted.logits.argmax(axis=1)


def shift_report(run: ClassifierRun, target: str | Path, name: str | None = None, batch_size: int | None = None,
                 workers: int | None = None, device: str = "auto") -> dict:
    """Compare the images in `target` (class folders, a CSV, or a folder of unlabelled images) with
    the run's held-out images; write RUN/shift/<name>/ (name: the target's) and return shift.json's record."""
    root = Path(target).expanduser()
    if not root.exists():
        raise UserError(f"target does not exist: {root}")
    root = root.resolve()
    name = _checked_name(name if name is not None else (root.stem if root.is_file() else root.name))
    split, source_samples = _source_samples(run)
    target_samples, unknown = _target_samples(run, root)

    plan = plan_inference(resolve_device(device), batch_size, workers=workers)
    model, plan = load_for_inference(run, plan, fallback=True)
    detector = load_ood(run)

    def domain(samples: list[tuple[str, int]]) -> Domain:
        extracted = extract(model, plan, run.preprocessing.eval_transform(), [p for p, _ in samples],
                            run.config.max_pixels)
        kept, true_of = set(extracted.paths), dict(samples)
        if not extracted.paths:
            return Domain(extracted, np.zeros(0, int), {}, [p for p, _ in samples])
        scores = (detector.score(extracted.logits, extracted.features) if detector is not None
                  else {"energy": EnergyBased.score(torch.from_numpy(extracted.logits)).double().numpy()})
        return Domain(extracted, np.array([true_of[p] for p in extracted.paths]), scores,
                      [p for p, _ in samples if p not in kept])

    source, shifted = domain(source_samples), domain(target_samples)
    if not shifted.extracted.paths:
        raise UserError(f"none of the {len(target_samples)} images in {root} could be read")
    if not source.extracted.paths:
        raise UserError(f"none of the run's {len(source_samples)} {split} images could be read")
    result = {"name": name, "target": str(root), "source_split": split, "unknown_classes": unknown,
              "notes": _notes(run, root, unknown, detector is not None),
              "skipped": [{"domain": d, "path": p} for d, dom in (("source", source), ("target", shifted))
                          for p in dom.skipped],
              **_compare(run, source, shifted, detector)}
    return _write(run, name, source, shifted, result)


def _checked_name(name: str) -> str:
    """A folder name under RUN/shift; hidden names are the staging folders'."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
        raise UserError(f"--name {name!r} must be a plain folder name (no slashes, not starting with '.')")
    return name


def _source_samples(run: ClassifierRun) -> tuple[str, list[tuple[str, int]]]:
    index = {label: i for i, label in enumerate(run.labels)}
    for split in SOURCE_SPLITS:
        samples = [(str(p), index[label]) for p, label in run.split_samples(split) if label in index]
        if samples:
            return split, samples
    raise UserError(f"{run.dir} has no test or validation images in its splits.csv to compare the target with")


def _target_samples(run: ClassifierRun, root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """Each target image with its class index (UNLABELLED outside the run's classes), and the
    target's classes the run lacks. A folder without sub-folders is a folder of unlabelled images."""
    if root.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        files = list_image_files(root)
        if not files:
            raise UserError(f"no images found in {root}")
        return [(str(p), a.UNLABELLED) for p in files], []
    found = discover(root, split=False).samples
    index = {label: i for i, label in enumerate(run.labels)}
    unknown = sorted({s.label for s in found if s.label not in index})
    return [(s.path, index.get(s.label, a.UNLABELLED)) for s in found], unknown


def _notes(run: ClassifierRun, root: Path, unknown: list[str], fitted: bool) -> list[str]:
    notes = []
    if unknown:
        notes.append(f"Classes of {root.name} that the run does not have: {', '.join(unknown)}; their images "
                     f"count as unlabelled (no accuracy; their predicted class is used). The run's classes: "
                     f"{', '.join(run.labels)}.")
    if not fitted:
        notes.append(NO_KNN_NOTE.format(run=run.dir))
    return notes


def _compare(run: ClassifierRun, source: Domain, shifted: Domain, detector: OODDetector | None) -> dict:
    """Every number of the report, from the two domains' arrays."""
    labels, n = run.labels, len(run.labels)
    scorer = PRIMARY if PRIMARY in source.scores else "energy"
    accuracy = {"source": a.accuracy(source.true, source.predicted, n),
                "target": a.accuracy(shifted.true, shifted.predicted, n)}
    classes = a.per_class(labels, source.true, source.predicted, source.extracted.features, shifted.true,
                          shifted.predicted, shifted.extracted.features, shifted.scores)
    auroc = a.domain_auroc(source.scores, shifted.scores)
    result = {
        "labels": labels, "primary": scorer, "scorers": list(source.scores), "auroc": auroc,
        "images": {"source": len(source.extracted.paths), "target": len(shifted.extracted.paths)},
        "target_labelled": int((shifted.true != a.UNLABELLED).sum()),
        "accuracy": accuracy, "per_class": classes,
        "reading": a.reading(auroc, scorer, accuracy["source"], accuracy["target"], classes),
    }
    if detector is not None:
        result["flagged"] = {"scorer": PRIMARY, "threshold": detector.thresholds_[PRIMARY],
                             "source": float(detector.flag(source.scores).mean()),
                             "target": float(detector.flag(shifted.scores).mean())}
    return result


def _write(run: ClassifierRun, name: str, source: Domain, shifted: Domain, result: dict) -> dict:
    """Figures, overlays, shift.json and report.html into a hidden folder, then swapped into place."""
    out = run.dir / SHIFT_DIR / name
    staging = out.with_name(f".{name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        points = _embedding(run, source, shifted, staging / EMBEDDING_FILE)
        result["embedding"] = {"method": "t-SNE", "figure": EMBEDDING_FILE, **points}
        result["pairs"] = _pairs(run, source, shifted, result, staging / GRADCAM_DIR)
        write_text_atomic(staging / RESULT_FILE, json.dumps(result, indent=2))
        overlays = [(staging / p["target"]["overlay"], staging / p["source"]["overlay"]) for p in result["pairs"]]
        render_page("shift.html", staging / REPORT_FILE, title=f"Domain shift: {name}",
                    embedding_png=staging / EMBEDDING_FILE, overlays=overlays, **result)
        if out.exists():
            old = out.with_name(f".{name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result["report"] = str(out / REPORT_FILE)
    return result


def _embedding(run: ClassifierRun, source: Domain, shifted: Domain, path: Path) -> dict:
    """t-SNE of at most EMBEDDED_PER_DOMAIN images of each domain, marked by true class where known,
    else predicted."""
    picks = [a.subsample(len(d.extracted.paths), EMBEDDED_PER_DOMAIN, seed) for seed, d in enumerate((source, shifted))]
    features = np.concatenate([d.extracted.features[p] for d, p in zip((source, shifted), picks)])
    classes = np.concatenate([np.where(d.true[p] == a.UNLABELLED, d.predicted[p], d.true[p])
                              for d, p in zip((source, shifted), picks)])
    groups = np.array(["source"] * len(picks[0]) + ["target"] * len(picks[1]))
    embedding_png(a.embed(features), groups, classes, run.labels,
                  "t-SNE of normalised features (marker: true class, else predicted)", path)
    return {"source_points": len(picks[0]), "target_points": len(picks[1])}


def _pairs(run: ClassifierRun, source: Domain, shifted: Domain, result: dict, out_dir: Path) -> list[dict]:
    """Grad-CAM of the most out-of-distribution target images next to their nearest source images."""
    order = a.most_ood(shifted.scores[result["primary"]], PAIRS)
    matches, similarity = a.nearest(shifted.extracted.features[order], source.extracted.features)
    shown = [shifted.extracted.paths[i] for i in order]
    nearest = [source.extracted.paths[j] for j in matches]
    paths = list(dict.fromkeys(shown + nearest))  # one source image can be nearest to several target images
    try:
        records = dict(zip(paths, explain(run, paths, method="gradcam", out_dir=out_dir)))
    except Exception as exc:  # an extra for the report: a backbone Grad-CAM cannot handle is noted
        result["notes"].append(f"no Grad-CAM pairs: {exc}")
        return []
    side = functools.partial(_side, labels=run.labels, scorer=result["primary"], folder=out_dir.parent)
    return [{"similarity": float(similarity[k]), "target": side(records[shown[k]], shifted, i),
             "source": side(records[nearest[k]], source, j)}
            for k, (i, j) in enumerate(zip(order, matches))
            if "overlay" in records[shown[k]] and "overlay" in records[nearest[k]]]


def _side(record: dict, domain: Domain, i: int, labels: list[str], scorer: str, folder: Path) -> dict:
    """One image of a pair: its classes, its score, and its overlay relative to the report's folder."""
    true = int(domain.true[i])
    return {"path": record["path"], "file": Path(record["path"]).name,
            "actual": labels[true] if true != a.UNLABELLED else None, "predicted": record["label"],
            "probability": record["probability"], "score": float(domain.scores[scorer][i]),
            "overlay": str(Path(record["overlay"]).relative_to(folder))}
