"""The OOD detector on synthetic features: thresholds keep 95% of validation, a shift is flagged,
and what is saved scores exactly as what was fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from visiontune.errors import UserError
from visiontune.ood import detector as ood
from visiontune.ood.detector import OODDetector

DIM = 16


def features(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, logits) of two Gaussian classes; `shift` moves every image off them."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.normal(0, 1, (n, DIM))
    x[:, 0] += 6 * labels
    x[:, 1] += 6 * (1 - labels)
    x[:, 2:] += shift
    logits = np.stack([x[:, 1], x[:, 0]], axis=1)
    return x.astype(np.float32), labels, logits.astype(np.float32)


def fitted(n_train: int = 400, n_val: int = 200, **options) -> OODDetector:
    train, labels, _ = features(n_train, 0)
    val, _, val_logits = features(n_val, 1)
    return OODDetector(**options).fit(train, labels, val_logits, val)


def test_each_threshold_keeps_95_percent_of_validation():
    detector = fitted()
    val, _, logits = features(200, 1)
    scores = detector.score(logits, val)
    assert set(scores) == {"energy", "knn", "mahalanobis"}
    for name, values in scores.items():
        kept = (values <= detector.thresholds_[name]).mean()
        assert 0.95 <= kept <= 0.96, name
    assert 0.04 <= detector.flag(scores).mean() <= 0.05


def test_shifted_features_score_higher_and_are_flagged():
    detector = fitted()
    val, _, val_logits = features(200, 1)
    shifted, _, shifted_logits = features(200, 2, shift=3.0)
    near, far = detector.score(val_logits, val), detector.score(shifted_logits, shifted)
    truth = np.r_[np.zeros(200), np.ones(200)]
    assert roc_auc_score(truth, np.r_[near["knn"], far["knn"]]) > 0.99
    assert roc_auc_score(truth, np.r_[near["mahalanobis"], far["mahalanobis"]]) > 0.99
    assert detector.flag(far).mean() > 0.9
    columns = detector.columns(far)
    assert columns[0] == {"ood_score": pytest.approx(far["knn"][0]), "ood": bool(far["knn"][0] > detector.thresholds_["knn"])}


def test_saved_detector_scores_exactly_as_fitted(tmp_path):
    detector = fitted()
    detector.save(tmp_path, checkpoint_sha256="abc")
    loaded = OODDetector.load(tmp_path)
    shifted, _, logits = features(50, 3, shift=0.5)
    before, after = detector.score(logits, shifted), loaded.score(logits, shifted)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    assert loaded.thresholds_ == detector.thresholds_
    assert loaded.record_["checkpoint_sha256"] == "abc" and loaded.record_["k"] == detector.k_


def test_k_follows_one_neighbour_per_thousand_images_and_the_bank_is_capped(monkeypatch):
    assert [ood.default_k(n) for n in (10, 400, 1499, 50_000)] == [1, 1, 1, 50]
    monkeypatch.setattr(ood, "BANK_LIMIT", 100)
    detector = fitted(n_train=300)
    assert len(detector.bank_) == 100 and detector.bank_.dtype.is_floating_point


def test_mahalanobis_is_left_out_with_fewer_images_than_dimensions():
    detector = fitted(n_train=DIM)  # 16 images x 16 dimensions: a singular covariance
    assert detector.scorers == ["energy", "knn"]


def test_bad_options_and_damaged_files_are_one_message(tmp_path):
    with pytest.raises(UserError, match="k=500 exceeds the 400 training images"):
        fitted(k=500)
    with pytest.raises(UserError, match="keep must be a fraction"):
        OODDetector(keep=1.0)
    fitted().save(tmp_path)
    record = json.loads((tmp_path / ood.OOD_FILE).read_text())
    del record["thresholds"]
    (tmp_path / ood.OOD_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match="damaged.*visiontune ood fit"):
        OODDetector.load(tmp_path)
