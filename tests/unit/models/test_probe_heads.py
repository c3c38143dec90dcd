"""A fitted logistic-regression probe folded into one nn.Linear gives the same probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from visiontune.models.probe_heads import (
    PROBE_SCORES,
    class_probabilities,
    load_linear_head,
    select_classifier,
)


def blobs(n_classes: int, seed: int = 0, n: int = 30, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (n_classes, dim))
    y = np.arange(n) % n_classes
    return centres[y] + rng.normal(0, 1.5, (n, dim)) * rng.uniform(0.5, 3, dim) + 5, y


@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_head_reproduces_the_pipeline_probabilities(n_classes):
    (x, y), (xv, yv) = blobs(n_classes, 0), blobs(n_classes, 1)
    pipeline, chosen, table = select_classifier("logreg", (x, y), (xv, yv), n_classes, seed=0)
    head = nn.Linear(x.shape[1], n_classes)
    load_linear_head(head, pipeline, n_classes)
    torch_probs = head(torch.as_tensor(xv, dtype=torch.float32)).softmax(1).detach().numpy()
    np.testing.assert_allclose(torch_probs, class_probabilities(pipeline, xv, n_classes), atol=1e-5)
    assert chosen["C"] in [row["C"] for row in table] and len(table) == 5


def test_selection_follows_the_score_and_breaks_ties_on_loss():
    (x, y), (xv, yv) = blobs(3, 0), blobs(3, 1)
    _, chosen, table = select_classifier("logreg", (x, y), (xv, yv), 3, seed=0, score=PROBE_SCORES["val_loss"])
    assert chosen["C"] == min(table, key=lambda row: row["val_loss"])["C"]
    best_f1 = max(row["val_score"] for row in select_classifier(
        "logreg", (x, y), (xv, yv), 3, seed=0, score=PROBE_SCORES["val_f1_macro"])[2])
    _, chosen, table = select_classifier("logreg", (x, y), (xv, yv), 3, seed=0, score=PROBE_SCORES["val_f1_macro"])
    tied = [row for row in table if row["val_score"] == best_f1]
    assert chosen["C"] == min(tied, key=lambda row: row["val_loss"])["C"]


def test_a_non_linear_head_is_refused():
    (x, y), (xv, yv) = blobs(2, 0), blobs(2, 1)
    pipeline, _, _ = select_classifier("logreg", (x, y), (xv, yv), 2, seed=0)
    with pytest.raises(TypeError):
        load_linear_head(nn.Sequential(nn.Linear(8, 2)), pipeline, 2)
