"""Classifiers fitted on frozen features (scikit-learn), and a linear one folded into a torch head.

`visiontune probe` scores these classifiers; `train` fits the logistic-regression one as its
first stage and copies it into the model's own linear classifier, so fine-tuning starts from a
converged head (linear probing then fine-tuning, Kumar et al. 2022) and can never end below it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, log_loss
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from visiontune.errors import UserError

# Candidates from most to least regularised.
GRIDS = {"logreg": ("C", (0.001, 0.01, 0.1, 1.0, 10.0)), "svm": ("C", (0.001, 0.01, 0.1, 1.0, 10.0)),
         "knn": ("n_neighbors", (25, 15, 9, 5, 3, 1))}
CLASSIFIERS = tuple(GRIDS)
Score = Callable[[np.ndarray, np.ndarray], float]  # (y_true, probabilities) -> higher is better


def accuracy_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == y_true).mean())


def f1_macro_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    labels = np.arange(probs.shape[1])
    return float(f1_score(y_true, probs.argmax(1), labels=labels, average="macro", zero_division=0))


def neg_log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    clipped = np.clip(probs, 1e-12, 1)
    return -float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=np.arange(probs.shape[1])))


# the score a probe's regularisation is chosen by, for each `--monitor`
PROBE_SCORES: dict[str, Score] = {"val_accuracy": accuracy_score, "val_f1_macro": f1_macro_score,
                                  "val_loss": neg_log_loss}


def make_classifier(kind: str, value: float, n_train_per_class: int, seed: int) -> Pipeline:
    """Standardised features into LogisticRegression, a calibrated LinearSVC, or k-nearest neighbours."""
    if kind == "logreg":
        estimator = LogisticRegression(C=value, max_iter=5000)
    elif kind == "svm":  # LinearSVC has no probabilities: Platt-calibrated by cross-validation on train
        estimator = CalibratedClassifierCV(LinearSVC(C=value, max_iter=20_000, random_state=seed), cv=min(3, n_train_per_class))
    else:
        estimator = KNeighborsClassifier(n_neighbors=int(value))
    return make_pipeline(StandardScaler(), estimator)


def class_probabilities(pipeline: Pipeline, features: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class (zero for classes the training split lacked)."""
    probs = np.zeros((len(features), n_classes))
    probs[:, pipeline.classes_] = pipeline.predict_proba(features)
    return probs


def select_classifier(kind: str, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                      n_classes: int, seed: int, score: Score = accuracy_score,
                      ) -> tuple[Pipeline, dict, list[dict]]:
    """Fit every candidate on train, keep the best validation `score`: (pipeline, chosen, table).

    Ties (frequent for accuracy on a small validation split) go to the lower validation log loss.
    """
    name, values = GRIDS[kind]
    counts = np.bincount(train[1])
    if (counts > 0).sum() < 2:
        raise UserError("a probe needs at least 2 classes with readable images in the train split")
    per_class = int(counts[counts > 0].min())
    if kind == "svm" and per_class < 2:
        raise UserError("--classifier svm needs at least 2 training images in every class")
    if kind == "knn":
        values = tuple(v for v in values if v <= len(train[1])) or (1,)
    best, table = None, []
    for value in values:
        pipeline = make_classifier(kind, value, per_class, seed).fit(*train)
        probs = class_probabilities(pipeline, val[0], n_classes)
        rank = (score(val[1], probs), neg_log_loss(val[1], probs))  # ties go to the lower val loss
        table.append({name: value, "val_accuracy": accuracy_score(val[1], probs), "val_score": rank[0],
                      "val_loss": -rank[1]})
        if best is None or rank > best[1]:
            best = (pipeline, rank, {name: value})
    return best[0], best[2], table


def linear_head_weights(pipeline: Pipeline, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one nn.Linear computing the logits of a StandardScaler + LogisticRegression.

    The scaler folds into the weights: w (x - mean) / scale + b = (w / scale) x + (b - w mean / scale).
    A binary model's single score s becomes the logits (-s/2, s/2), whose softmax is sigmoid(s).
    """
    scaler, logreg = pipeline.named_steps["standardscaler"], pipeline.named_steps["logisticregression"]
    coef = logreg.coef_ / scaler.scale_
    intercept = logreg.intercept_ - coef @ scaler.mean_
    if coef.shape[0] == 1:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((n_classes, coef.shape[1]))
    bias = np.full(n_classes, -1e4)  # a class the training split lacked is never predicted
    weight[logreg.classes_], bias[logreg.classes_] = coef, intercept
    return torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)


def load_linear_head(classifier: nn.Module, pipeline: Pipeline, n_classes: int) -> None:
    """Copy a fitted logistic-regression pipeline into `classifier` (an nn.Linear) in place."""
    if not isinstance(classifier, nn.Linear) or classifier.out_features != n_classes:
        raise TypeError(f"need an nn.Linear head with {n_classes} outputs, got {classifier}")
    weight, bias = linear_head_weights(pipeline, n_classes)
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
