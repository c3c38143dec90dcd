"""Out-of-fold probabilities by fine-tuning: the training recipe run once per fold.

Each fold's model is trained on the other folds only, its epoch chosen on a validation share
drawn from those same folds, and it then predicts the held-out fold once; so every image is
scored by a model that never saw its label, as with the linear head, but through the full
recipe (slower by the number of folds, and better where frozen features separate the classes
poorly). The folds are the linear head's (same stratification and seed), and the fold runs live
in a temporary folder inside the audit's output that is removed afterwards.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from visiontune.audit.analysis import Folds, checked_folds
from visiontune.config import build_config
from visiontune.errors import UserError
from visiontune.models.classifier_run import ClassifierRun
from visiontune.training.finetune import fit

log = logging.getLogger(__name__)
# Recipe fields that name this data, that run's directory or its curation: the folds set their own.
PER_RUN_FIELDS = ("data", "out", "exclude", "relabel", "label_regex", "lr")


def fold_recipe(run: str | Path | None, model: str | None, options: dict) -> dict:
    """TrainConfig values of every fold: a run's recipe (`run`), or the defaults for `model`;
    `options` (epochs, weights, device, ...) override either. A run's lr is kept when it was a
    number; `auto` would search again in every fold."""
    if run is not None:
        values = ClassifierRun(run).config.model_dump()
        lr = values.get("lr")
        values = {k: v for k, v in values.items() if k not in PER_RUN_FIELDS}
        if isinstance(lr, (int, float)):
            values["lr"] = lr
    else:
        values = {"model": model}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    return {**values, **given, "report": False}


def fine_tuned_probabilities(paths: list[str], labels: np.ndarray, classes: list[str], recipe: dict,
                             work_dir: Path, folds: int = 5, seed: int = 0, val_share: float = 0.15,
                             progress: bool = False) -> tuple[Folds, list[dict]]:
    """Class probabilities [N, C] of every row from the fold model that held it out, and a record per fold."""
    folds, notes = checked_folds(labels, classes, folds)
    probs = np.zeros((len(labels), len(classes)))
    records = []
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with tempfile.TemporaryDirectory(prefix=".folds-", dir=work_dir) as tmp:
        for k, (train, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels), start=1):
            val = _validation_rows(train, labels, val_share, seed + k)
            source = Path(tmp) / f"fold-{k}.csv"
            _write_source(source, paths, labels, classes, train, val)
            log.info("fold %d/%d: fine-tuning on %d images (%d for validation)", k, folds, len(train), len(val))
            run = fit(str(source), config=build_config(recipe, "the audit's fold recipe"), progress=progress,
                      out=str(Path(tmp) / f"run-{k}"), seed=seed)
            probs[held_out] = _probabilities(run, [paths[i] for i in held_out], classes, recipe)
            records.append({"fold": k, "trained_on": len(train) - len(val), "validated_on": len(val),
                            "held_out": len(held_out), "best_epoch": run.summary.get("best_epoch"),
                            "val_accuracy": run.summary.get("val", {}).get("accuracy")})
    return Folds(probs, folds, notes), records


def _validation_rows(train: np.ndarray, labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """About `share` of each class's training rows (at least one, never all) for choosing the epoch."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[train]):
        rows = train[labels[train] == label]
        n = min(len(rows) - 1, max(1, round(share * len(rows))))
        chosen.append(rng.choice(rows, size=n, replace=False))
    return np.sort(np.concatenate(chosen))


def _write_source(path: Path, paths: list[str], labels: np.ndarray, classes: list[str], train: np.ndarray,
                  val: np.ndarray) -> None:
    """The fold's data as a CSV source with a split column (absolute paths, so it reads from anywhere)."""
    held = set(val.tolist())
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for i in train:
            writer.writerow([str(Path(paths[i]).resolve()), classes[labels[i]], "val" if i in held else "train"])


def _probabilities(run, paths: list[str], classes: list[str], recipe: dict) -> np.ndarray:
    """Every class's probability for `paths` from the fold's run (columns matched by class name)."""
    result = run.predict(paths, top_k=len(run.labels), device=recipe.get("device", "auto"),
                         workers=recipe.get("workers"), threads=recipe.get("threads"))
    by_path = {str(Path(row["path"]).resolve()): row for row in result.rows}
    probs = np.zeros((len(paths), len(classes)))
    column = {name: j for j, name in enumerate(classes)}
    for i, path in enumerate(paths):
        row = by_path.get(str(Path(path).resolve()))
        if row is None:
            raise UserError(f"{path} could be read for the features but not for its fold's predictions; "
                            "was it changed during the audit?")
        for rank in range(1, len(run.labels) + 1):
            probs[i, column[row[f"top{rank}_label"]]] = row[f"top{rank}_probability"]
    return probs
