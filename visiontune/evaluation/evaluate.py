"""`visiontune evaluate`: metrics, figures and saved predictions for one split or another folder.

Every choice (decision threshold, temperature) is made on the validation split; the split being
evaluated is only ever predicted. Outputs go to RUN/eval/<name>/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from visiontune.data.sources import discover
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.evaluation import metrics as m
from visiontune.evaluation import plots
from visiontune.evaluation.calibration import fit_temperature
from visiontune.evaluation.stress import stress_test
from visiontune.explain.explainer import explain
from visiontune.inference.engine import iter_logits, load_for_inference, plan_inference
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.losses import probabilities
from visiontune.ood.detector import PRIMARY, OODDetector
from visiontune.ood.fit import load_ood
from visiontune.runformat import SPLITS_FILE

HONESTY_NOTE = (
    "Test and out-of-domain images are used for no choice: the checkpoint, the decision threshold and "
    "the temperature are all chosen on the validation split. Evaluation never augments."
)
EXPLAINED_IMAGES = 4
NO_OOD_NOTE = "No OOD scores: the run has no fitted OOD scorers (fit them with `visiontune ood fit RUN`)."
SELECTION_NOTE = (
    "Optimistic: the {split} split took part in choices (it is what the model was {what} on), so "
    "these numbers overstate performance on new images. Evaluate the test split or --data for that."
)


@dataclass
class Predicted:
    """The readable images of one evaluated set, with their targets and the model's outputs."""

    paths: list[str]
    logits: np.ndarray
    y_true: np.ndarray
    skipped: list[tuple[str, str]]
    features: np.ndarray | None  # penultimate features, when the run has OOD scorers


def evaluate_run(
    run: ClassifierRun,
    split: str = "test",
    data: str | None = None,
    target_recall: float | None = None,
    positive: str | None = None,
    temperature: bool = False,
    top_n: int = 8,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    backend: str | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    stress: bool = False,
) -> dict:
    """Evaluate the best checkpoint of `run` on `split`, or on the folder `data` (out of domain).

    Speed options left unset come from `plan_inference` for the device. `stress` adds accuracy
    under perturbations (evaluation/stress.py) to the result, stress.json and stress.png.
    """
    labels = run.labels
    name, samples, unknown = _select(run, split, data)
    plan = plan_inference(resolve_device(device), batch_size, precision, backend, quantize, workers=workers)
    model, plan = load_for_inference(run, plan, fallback=backend is None and quantize is None)
    transform = run.preprocessing.eval_transform()
    ood = load_ood(run)
    infer = {"plan": plan, "max_pixels": run.config.max_pixels, "features": ood is not None}

    def predict(pairs: list[tuple[str, int]]) -> Predicted:
        target_of = dict(pairs)
        paths, logits, features, skipped = [], [], [], []
        for batch in iter_logits(model, transform, [p for p, _ in pairs], **infer):
            paths += batch.paths
            logits.append(batch.logits.reshape(len(batch.paths), -1))
            if batch.features is not None and batch.paths:
                features.append(batch.features)
            skipped += batch.skipped
        stacked = np.concatenate(logits) if paths else np.zeros((0, len(labels)), np.float32)
        return Predicted(paths, stacked, np.array([target_of[p] for p in paths], dtype=int), skipped,
                         np.concatenate(features) if features else None)

    evaluated = predict(samples)
    paths, logits, y_true, skipped = evaluated.paths, evaluated.logits, evaluated.y_true, evaluated.skipped
    if not paths:
        raise UserError(f"no readable images to evaluate in {name}")
    binary = len(labels) == 2
    positive_index = _positive_index(labels, positive) if binary else None
    needs_val = temperature or target_recall is not None
    if target_recall is not None and not binary:
        raise UserError("--target-recall applies to binary tasks only")
    val = predict(_split_samples(run, "val")) if needs_val and name != "val" else evaluated

    out_dir = run.dir / "eval" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = probabilities(logits, run.metadata["loss"])
    result = {
        "name": name, "split": split if data is None else None, "data": data,
        "checkpoint": "best", "labels": labels, "notes": _notes(name),
        **m.prediction_metrics(y_true, probs, labels),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "unknown_classes": unknown,
    }
    if temperature:
        t = fit_temperature(val.logits, val.y_true)
        _save_json(run.dir / "calibration.json", {"temperature": t, "fitted_on": "val"})
        result["calibration"]["temperature"] = t
        result["calibration"]["temperature_scaled"] = m.expected_calibration_error(
            y_true, probabilities(logits, run.metadata["loss"], t)
        )
    if binary:
        result["binary"] = _binary_block(run, labels, positive_index, y_true, probs, val, target_recall)
    if data is not None:
        result["in_domain"] = _in_domain_reference(run)
    ood_rows = None
    if ood is None:
        result["notes"].append(NO_OOD_NOTE)
    else:
        in_domain = result.get("in_domain")  # another folder: scored against the run's own held-out images
        reference = predict(_split_samples(run, in_domain["split"])) if in_domain else None
        result["ood"], ood_rows = _ood_block(ood, evaluated, reference)
    if stress:
        result["stress"] = stress_test(run, samples, model, plan)
        _save_json(out_dir / "stress.json", result["stress"])
    _write_outputs(run, out_dir, result, paths, y_true, probs, top_n, ood_rows)
    _explain_worst(run, result, out_dir / "explanations")
    return result


def _notes(name: str) -> list[str]:
    if name == "val":
        return [SELECTION_NOTE.format(split="validation", what="selected and calibrated")]
    if name == "train":
        return [SELECTION_NOTE.format(split="training", what="fitted")]
    return [HONESTY_NOTE]


def _select(run: ClassifierRun, split: str, data: str | None) -> tuple[str, list[tuple[str, int]], list[str]]:
    if data is None:
        return split, _split_samples(run, split), []
    index = {label: i for i, label in enumerate(run.labels)}
    found = discover(data, split=False).samples
    unknown = sorted({s.label for s in found if s.label not in index})
    samples = [(s.path, index[s.label]) for s in found if s.label in index]
    if not samples:
        raise UserError(f"none of the classes in {data} match the run's classes {run.labels}")
    return f"ood-{Path(data).name}", samples, unknown


def _split_samples(run: ClassifierRun, split: str) -> list[tuple[str, int]]:
    if split not in ("train", "val", "test"):
        raise UserError(f"--split must be train, val or test, not {split!r}")
    index = {label: i for i, label in enumerate(run.labels)}
    samples = [(s.path, index[s.label]) for s in discover(run.dir / SPLITS_FILE).samples if s.split == split]
    if not samples:
        raise UserError(f"the run has no {split} split; try --split val, or --data DIR for another folder")
    return samples


def _positive_index(labels: list[str], positive: str | None) -> int:
    if positive is None:
        return 1
    if positive not in labels:
        raise UserError(f"--positive {positive!r} is not one of the classes {labels}")
    return labels.index(positive)


def _binary_block(run: ClassifierRun, labels: list[str], positive: int, y_true: np.ndarray, probs: np.ndarray,
                  val: Predicted, target_recall: float | None) -> dict:
    block = {"positive": labels[positive], **m.binary_curves(y_true, probs[:, positive], positive)}
    if target_recall is not None:
        val_probs = probabilities(val.logits, run.metadata["loss"])
        chosen = m.threshold_for_recall(val.y_true, val_probs[:, positive], positive, target_recall)
        saved = {"positive": labels[positive], "threshold": chosen["threshold"], "target_recall": target_recall,
                 "val_recall": chosen["recall"], "val_precision": chosen["precision"], "fitted_on": "val"}
        _save_json(run.dir / "threshold.json", saved)
    saved = run.threshold
    if saved is not None:
        at = m.precision_recall_at(y_true, probs[:, positive], positive, saved["threshold"])
        block["threshold"] = {**saved, "here": at}
    return block


def _ood_block(ood: OODDetector, evaluated: Predicted, reference: Predicted | None) -> tuple[dict, list[dict]]:
    """The share of images flagged out of distribution, each image's score and flag, and, for
    another folder, how well each scorer tells it from the run's own held-out images (AUROC)."""
    scores = ood.score(evaluated.logits, evaluated.features)
    flagged = ood.flag(scores)
    block = {"primary": PRIMARY, "threshold": ood.thresholds_[PRIMARY], "keep": ood.keep,
             "flagged_rate": float(flagged.mean()), "flagged": int(flagged.sum()), "images": len(flagged)}
    if reference is not None and len(reference.paths):
        in_domain = ood.score(reference.logits, reference.features)
        truth = np.r_[np.zeros(len(reference.paths)), np.ones(len(flagged))]
        block["reference_flagged_rate"] = float(ood.flag(in_domain).mean())
        block["auroc"] = {name: float(roc_auc_score(truth, np.r_[in_domain[name], scores[name]])) for name in scores}
    return block, ood.columns(scores)


def _in_domain_reference(run: ClassifierRun) -> dict | None:
    summary = run.summary
    for split in ("test", "val"):
        if split in summary:
            return {"split": split, "accuracy": summary[split]["accuracy"], "f1_macro": summary[split]["f1_macro"]}
    return None


def _write_outputs(run: ClassifierRun, out_dir: Path, result: dict, paths: list[str], y_true: np.ndarray,
                   probs: np.ndarray, top_n: int, ood_rows: list[dict] | None) -> None:
    rows, losses = write_predictions_csv(out_dir / "predictions.csv", paths, y_true, probs, result["labels"], ood_rows)
    order = np.argsort(-losses, kind="stable")
    worst = [rows[i] for i in order[:top_n]]
    best = [rows[i] for i in order[::-1][:top_n]]
    figures = {"confusion_matrix": "confusion_matrix.png", "top_losses": "top_losses.png",
               "best_predictions": "best_predictions.png", "reliability": "reliability.png"}
    plots.confusion_matrix_png(result["confusion_matrix"], out_dir / figures["confusion_matrix"])
    plots.prediction_grid_png(worst, "top losses (worst predictions)", out_dir / figures["top_losses"], run.config.max_pixels)
    plots.prediction_grid_png(best, "most confident correct predictions", out_dir / figures["best_predictions"], run.config.max_pixels)
    plots.reliability_png({k: v for k, v in result["calibration"].items() if isinstance(v, dict)}, out_dir / figures["reliability"])
    if result.get("binary", {}).get("roc_auc") is not None:
        figures["roc_pr"] = "roc_pr.png"
        plots.binary_curves_png(result["binary"], result["binary"]["positive"], out_dir / figures["roc_pr"])
    if "stress" in result:
        figures["stress"] = "stress.png"
        plots.stress_png(result["stress"], out_dir / figures["stress"])
    result["top_losses"] = worst
    result["figures"] = figures
    _save_json(out_dir / "metrics.json", result)


def write_predictions_csv(path: Path, paths: list[str], y_true: np.ndarray, probs: np.ndarray,
                          labels: list[str], extra: list[dict] | None = None) -> tuple[list[dict], np.ndarray]:
    """predictions.csv: every image with its class probabilities, loss and `extra` columns (OOD
    score and flag); returns (rows, losses)."""
    y_pred = probs.argmax(axis=1)
    losses = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None))
    extra = extra or [{}] * len(paths)
    rows = [
        {"path": p, "actual": labels[t], "predicted": labels[q], "probability": float(probs[i, q]),
         "loss": float(losses[i]), **{f"p_{label}": float(probs[i, k]) for k, label in enumerate(labels)}, **extra[i]}
        for i, (p, t, q) in enumerate(zip(paths, y_true, y_pred))
    ]
    write_csv_atomic(path, list(rows[0]), rows)
    return rows, losses


def _explain_worst(run: ClassifierRun, result: dict, out_dir: Path) -> None:
    """Grad-CAM of the worst predictions, for the report; a backbone it cannot handle is noted."""
    worst = [row["path"] for row in result["top_losses"][:EXPLAINED_IMAGES]]
    try:
        explain(run, worst, method="gradcam", out_dir=out_dir)
    except Exception as exc:  # an extra for the report: a model Grad-CAM cannot handle is noted
        result["notes"].append(f"no Grad-CAM examples: {exc}")
        _save_json(out_dir.parent / "metrics.json", result)


def _save_json(path: Path, values: dict) -> None:
    write_text_atomic(path, json.dumps(values, indent=2))
