"""The numbers of a domain shift, on arrays only (features, predictions, OOD scores), so that each
one is checked by hand on synthetic data without a model.

Classes are indices into the run's labels; a target image of no known class is `UNLABELLED`.
Feature comparisons use L2-normalised features (cosine geometry), the space the KNN scorer
measures in, so that "close" means the same thing here as in the OOD flag.
"""

from __future__ import annotations

import numpy as np
from sklearn.manifold import TSNE
from sklearn.metrics import roc_auc_score

from visiontune.evaluation.metrics import bootstrap_intervals

UNLABELLED = -1
MAX_PERPLEXITY = 30
FAR, CLEAR, SLIGHT = 0.9, 0.7, 0.6  # AUROC bands of the plain reading


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def domain_auroc(source: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> dict[str, float]:
    """Per scorer, the AUROC of telling target (1) from source (0) by its score: 0.5 when a
    scorer sees no shift, 1 when every target image scores above every source image."""
    auroc = {}
    for name in source:
        truth = np.r_[np.zeros(len(source[name])), np.ones(len(target[name]))]
        auroc[name] = float(roc_auc_score(truth, np.r_[source[name], target[name]]))
    return auroc


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict | None:
    """Accuracy of the labelled images (`UNLABELLED` ones left out) with its 95% bootstrap
    interval; None when none is labelled."""
    known = np.asarray(y_true) != UNLABELLED
    y_true, y_pred = np.asarray(y_true)[known], np.asarray(y_pred)[known]
    if not len(y_true):
        return None
    ci = bootstrap_intervals(y_true, y_pred, n_classes)["accuracy"]
    return {"accuracy": float(np.mean(y_true == y_pred)), "ci95": ci, "images": int(len(y_true))}


def shares(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """The share of images in each class (of the predicted classes: the prediction distribution)."""
    classes = np.asarray(classes, dtype=int)
    return np.bincount(classes, minlength=n_classes) / max(len(classes), 1)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity of two vectors."""
    return float(1 - a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def per_class(labels: list[str], source_true: np.ndarray, source_pred: np.ndarray, source_features: np.ndarray,
              target_true: np.ndarray, target_pred: np.ndarray, target_features: np.ndarray,
              target_scores: dict[str, np.ndarray]) -> list[dict]:
    """For each class: accuracy in each domain (None without labelled images of it), the share
    of each domain predicted as it, the mean OOD scores of the target images predicted as it, and
    the cosine distance between its source and target centroids of normalised features (a target
    image belongs to its true class, or to its predicted class when unlabelled)."""
    source_true, source_pred = np.asarray(source_true), np.asarray(source_pred)
    target_true, target_pred = np.asarray(target_true), np.asarray(target_pred)
    target_class = np.where(target_true == UNLABELLED, target_pred, target_true)
    source_unit, target_unit = normalise(source_features), normalise(target_features)
    source_share, target_share = shares(source_pred, len(labels)), shares(target_pred, len(labels))
    rows = []
    for c, label in enumerate(labels):
        in_source, in_target, predicted = source_true == c, target_true == c, target_pred == c
        members_source, members_target = source_unit[in_source], target_unit[target_class == c]
        rows.append({
            "class": label,
            "source_images": int(in_source.sum()),
            "target_images": int(in_target.sum()),
            "source_accuracy": float(np.mean(source_pred[in_source] == c)) if in_source.any() else None,
            "target_accuracy": float(np.mean(target_pred[in_target] == c)) if in_target.any() else None,
            "source_share": float(source_share[c]),
            "target_share": float(target_share[c]),
            "target_predicted": int(predicted.sum()),
            "mean_scores": {name: float(np.mean(scores[predicted])) if predicted.any() else None
                            for name, scores in target_scores.items()},
            "centroid_distance": (cosine_distance(members_source.mean(0), members_target.mean(0))
                                  if len(members_source) and len(members_target) else None),
        })
    return rows


def subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most `limit` of `n` items, drawn with `seed`."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE of the normalised features (perplexity min(30, (n - 1) / 3), as small sets need);
    the same features and seed give the same points."""
    n = len(features)
    if n < 2:
        raise ValueError(f"an embedding needs at least 2 points, not {n}")
    tsne = TSNE(2, perplexity=min(MAX_PERPLEXITY, (n - 1) / 3), init="pca", random_state=seed)
    return tsne.fit_transform(normalise(features))


def most_ood(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores, highest first (ties in input order)."""
    return np.argsort(-np.asarray(scores), kind="stable")[:count]


def nearest(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the index of the bank row closest in normalised feature space, and their
    cosine similarity."""
    similarity = normalise(queries) @ normalise(bank).T
    index = similarity.argmax(axis=1)
    return index, similarity[np.arange(len(queries)), index]


def reading(auroc: dict[str, float], scorer: str, source_accuracy: dict, target_accuracy: dict | None,
            classes: list[dict]) -> str:
    """One plain paragraph: how far the target is (AUROC of `scorer`), what happens to accuracy
    (or, unlabelled, to the predictions), and which class moved most in feature space."""
    value = auroc[scorer]
    if value >= FAR:
        sentences = [f"The target is far from the source ({scorer} AUROC {value:.2f}): "
                     "its images are told apart from the run's own held-out images almost every time."]
    elif value >= CLEAR:
        sentences = [f"The target is clearly shifted from the source ({scorer} AUROC {value:.2f})."]
    elif value >= SLIGHT:
        sentences = [f"The target is slightly shifted from the source ({scorer} AUROC {value:.2f})."]
    else:
        sentences = [f"The target looks like the source to the {scorer} score (AUROC {value:.2f})."]
    sentences.append(_accuracy_sentence(source_accuracy, target_accuracy, classes))
    moved = [row for row in classes if row["centroid_distance"] is not None]
    if moved:
        row = max(moved, key=lambda r: r["centroid_distance"])
        sentences.append(f"Class {row['class']} moved most in feature space (cosine distance "
                         f"{row['centroid_distance']:.2f} between its source and target centroids).")
    return " ".join(sentences)


def _accuracy_sentence(source: dict, target: dict | None, classes: list[dict]) -> str:
    if target is None:
        row = max(classes, key=lambda r: abs(r["target_share"] - r["source_share"]))
        return (f"The target has no labels the run knows, so its accuracy is unknown; the predicted share of "
                f"{row['class']} changes most ({row['source_share']:.0%} of source images, "
                f"{row['target_share']:.0%} of target images).")
    s, t = source["accuracy"], target["accuracy"]
    if source["ci95"][0] <= target["ci95"][1] and target["ci95"][0] <= source["ci95"][1]:
        return (f"Accuracy is {s:.2f} on the source and {t:.2f} on the target, a difference within "
                "their 95% intervals.")
    verb = "drops" if t < s else "rises"
    return (f"Accuracy {verb} from {s:.2f} (95% CI {source['ci95'][0]:.2f}-{source['ci95'][1]:.2f}) to "
            f"{t:.2f} ({target['ci95'][0]:.2f}-{target['ci95'][1]:.2f}).")
