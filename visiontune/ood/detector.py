"""Out-of-distribution scores of a classifier's inputs, and the threshold that flags one.

Three scorers from pytorch-ood, each an outlier score (higher = further from the training data):
- `energy` (Liu et al. 2020): -logsumexp of the logits; nothing to fit.
- `knn` (Sun et al. 2022): distance to the k-th nearest L2-normalised training feature; the
  strongest simple near-OOD method in OpenOOD's tables, and the one that flags (`PRIMARY`).
- `mahalanobis` (Lee et al. 2018): distance to the closest class mean under one shared covariance;
  only with more training images than feature dimensions (below that it is noise).

The fitted state is the training features themselves (a bank, seeded subsample beyond
BANK_LIMIT, stored in float16) and one threshold per scorer, as safetensors + JSON: nothing is
pickled, and loading refits the scorers from the bank (a neighbour index and one covariance).
Each threshold is the `keep` quantile of the validation images' scores, so `keep` (95%) of
in-distribution validation images pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from pytorch_ood.detector import KNN, EnergyBased, Mahalanobis

from visiontune.errors import UserError, first_line
from visiontune.io import atomic_write, read_json, write_text_atomic

SCORERS = ("energy", "knn", "mahalanobis")
PRIMARY = "knn"
KEEP = 0.95
BANK_LIMIT = 20_000
OOD_FILE, OOD_BANK_FILE = "ood.json", "ood.safetensors"


def default_k(bank_size: int) -> int:
    """Sun et al.'s ratio (k = 50 of CIFAR-10's 50,000 images, 1,000 of ImageNet's 1.28 M): about
    one neighbour per thousand training images, at least one."""
    return max(1, round(bank_size / 1000))


class OODDetector:
    """Energy, KNN and Mahalanobis scores with thresholds fitted on validation (scikit-learn style:
    the `_`-suffixed attributes exist once `fit` or `load` has run; `record_` once saved or loaded)."""

    def __init__(self, k: int | None = None, keep: float = KEEP, seed: int = 0) -> None:
        if k is not None and k < 1:
            raise UserError(f"k must be at least 1, not {k}")
        if not 0.5 <= keep < 1:
            raise UserError(f"keep must be a fraction in [0.5, 1), not {keep}")
        self.k, self.keep, self.seed = k, keep, seed

    def fit(self, train_features: np.ndarray, train_labels: np.ndarray, val_logits: np.ndarray,
            val_features: np.ndarray) -> OODDetector:
        """Bank the training features; set each scorer's threshold on the validation images."""
        if len(val_logits) == 0:
            raise UserError("fitting the OOD thresholds needs readable validation images")
        keep = np.arange(len(train_features))
        if len(keep) > BANK_LIMIT:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(keep), BANK_LIMIT, replace=False))
        bank = torch.from_numpy(np.asarray(train_features)[keep]).half()  # what `save` stores, scored as stored
        self.k_ = self.k or default_k(len(bank))
        if self.k_ > len(bank):
            raise UserError(f"k={self.k_} exceeds the {len(bank)} training images the OOD scores are fitted on")
        self._set_bank(bank, torch.from_numpy(np.asarray(train_labels)[keep]).long())
        val = self.score(val_logits, val_features)
        self.thresholds_ = {name: float(np.quantile(scores, self.keep, method="higher")) for name, scores in val.items()}
        return self

    def _set_bank(self, bank: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank_, self.bank_labels_ = bank, labels
        self._knn = KNN(None, k=self.k_).fit_features(bank.float(), labels)
        # Mahalanobis needs every class in the bank, and more images than feature dimensions: below
        # that its covariance is singular and the scores are noise (measured: AUROC 0.49 on a shift
        # KNN scores 0.65 at 300 images x 1,280 dims; 1.00 at 64 dims)
        usable = len(labels.unique()) == int(labels.max()) + 1 and len(bank) > bank.shape[1]
        self._mahalanobis = Mahalanobis(None).fit_features(bank.float(), labels) if usable else None

    @property
    def scorers(self) -> list[str]:
        return [name for name in SCORERS if name != "mahalanobis" or self._mahalanobis is not None]

    @torch.no_grad()
    def score(self, logits: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        """Every scorer's outlier score of each image (higher = more out of distribution)."""
        logits_t, features_t = torch.as_tensor(np.asarray(logits)).float(), torch.as_tensor(np.asarray(features)).float()
        scores = {
            "energy": EnergyBased.score(logits_t),
            "knn": self._knn.predict_features(features_t),
        }
        if self._mahalanobis is not None:
            scores["mahalanobis"] = self._mahalanobis.predict_features(features_t)
        return {name: value.double().numpy() for name, value in scores.items()}

    def flag(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """True where the primary scorer's score is beyond its threshold."""
        return scores[PRIMARY] > self.thresholds_[PRIMARY]

    def columns(self, scores: dict[str, np.ndarray]) -> list[dict]:
        """Each image's `ood_score` (the primary scorer's) and `ood` flag: what a prediction row carries."""
        return [{"ood_score": float(s), "ood": bool(f)} for s, f in zip(scores[PRIMARY], self.flag(scores))]

    def save(self, directory: Path, **record) -> None:
        """DIR/ood.safetensors (the bank) and DIR/ood.json (k, thresholds and `record`)."""
        tensors = {"bank": self.bank_.contiguous(), "labels": self.bank_labels_.contiguous()}
        atomic_write(directory / OOD_BANK_FILE, lambda tmp: safetensors.torch.save_file(tensors, tmp))
        self.record_ = {"primary": PRIMARY, "scorers": self.scorers, "thresholds": self.thresholds_, "k": self.k_,
                        "keep": self.keep, "bank_size": len(self.bank_), **record}
        write_text_atomic(directory / OOD_FILE, json.dumps(self.record_, indent=2))

    @classmethod
    def load(cls, directory: Path) -> OODDetector:
        """The detector `save` wrote in `directory`; a damaged file is one UserError."""
        meta = read_json(directory / OOD_FILE)
        try:
            detector = cls(int(meta["k"]), float(meta["keep"]))
            detector.k_, detector.record_ = detector.k, meta
            detector.thresholds_ = {name: float(value) for name, value in meta["thresholds"].items()}
            tensors = safetensors.torch.load_file(str(directory / OOD_BANK_FILE))
            detector._set_bank(tensors["bank"], tensors["labels"].long())
        except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
            raise UserError(f"{directory / OOD_FILE} or {OOD_BANK_FILE} is damaged ({first_line(exc, 200)}); "
                            f"fit again with: visiontune ood fit {directory}") from None
        return detector
