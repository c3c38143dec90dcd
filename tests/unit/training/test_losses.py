"""ClassificationLoss against PyTorch / torchvision references, class weights and probabilities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from visiontune.models.losses import ClassificationLoss, class_weights_for

C = 4


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, C, generator=generator) * 3
    targets = torch.arange(16) % C
    return logits, targets


def onehot(targets: torch.Tensor) -> torch.Tensor:
    return F.one_hot(targets, C).float()


def manual_focal(logits, targets, gamma):
    """Unweighted focal loss written out: BCE * (1 - p_t) ** gamma, summed over classes."""
    y = onehot(targets)
    p = logits.sigmoid()
    p_t = p * y + (1 - p) * (1 - y)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (bce * (1 - p_t) ** gamma).sum(dim=1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_matches_cross_entropy(batch, smoothing):
    logits, targets = batch
    loss = ClassificationLoss("ce", C, label_smoothing=smoothing)(logits, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=smoothing).item(), rel=1e-6)


def test_label_smoothing_changes_the_loss(batch):
    logits, targets = batch
    assert ClassificationLoss("ce", C, label_smoothing=0.1)(logits, targets).item() != pytest.approx(
        ClassificationLoss("ce", C)(logits, targets).item()
    )


def test_bce_is_one_vs_rest_summed_over_classes(batch):
    logits, targets = batch
    expected = F.binary_cross_entropy_with_logits(logits, onehot(targets), reduction="none").sum(1).mean()
    assert ClassificationLoss("bce", C)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.6, 1.0)])
def test_focal_matches_torchvision(batch, alpha, gamma):
    logits, targets = batch
    expected = sigmoid_focal_loss(logits, onehot(targets), alpha=alpha, gamma=gamma, reduction="none").sum(1).mean()
    loss = ClassificationLoss("focal", C, focal_alpha=alpha, focal_gamma=gamma)(logits, targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_with_negative_alpha_is_unweighted(batch):
    logits, targets = batch
    loss = ClassificationLoss("focal", C, focal_alpha=-1, focal_gamma=2.0)(logits, targets)
    assert loss.item() == pytest.approx(manual_focal(logits, targets, 2.0).mean().item(), rel=1e-6)
    weighted = ClassificationLoss("focal", C, focal_alpha=0.25, focal_gamma=2.0)(logits, targets)
    assert weighted.item() < loss.item()


def test_focal_with_gamma_zero_and_no_alpha_is_bce(batch):
    logits, targets = batch
    focal = ClassificationLoss("focal", C, focal_alpha=-1, focal_gamma=0.0)(logits, targets)
    assert focal.item() == pytest.approx(ClassificationLoss("bce", C)(logits, targets).item(), rel=1e-6)


def test_ce_class_weights_match_cross_entropy_weight(batch):
    logits, targets = batch
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    loss = ClassificationLoss("ce", C, class_weights=weights)(logits, targets)
    expected = F.cross_entropy(logits, targets, weight=weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, targets).item())


@pytest.mark.parametrize("kind", ["bce", "focal"])
def test_sigmoid_losses_weight_samples_by_their_class(batch, kind):
    logits, targets = batch
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    per_sample = torch.stack([ClassificationLoss(kind, C)(logits[i:i + 1], targets[i:i + 1]) for i in range(16)])
    w = weights[targets]
    expected = (per_sample * w).sum() / w.sum()
    loss = ClassificationLoss(kind, C, class_weights=weights)(logits, targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_half_precision_logits_give_a_float32_loss(batch):
    logits, targets = batch
    loss = ClassificationLoss("ce", C)(logits.half(), targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(F.cross_entropy(logits.half().float(), targets).item(), rel=1e-6)


def test_class_weights_are_sklearn_balanced():
    assert class_weights_for([30, 10]).tolist() == pytest.approx([40 / 60, 40 / 20])
    assert class_weights_for([5, 5, 5]).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert class_weights_for([0, 10]).tolist() == pytest.approx([11 / 2, 11 / 20])  # empty class -> count 1


@pytest.mark.parametrize("kind", ["ce", "bce", "focal"])
def test_probabilities_sum_to_one_and_keep_the_argmax(batch, kind):
    logits, _ = batch
    probs = ClassificationLoss(kind, C).probabilities(logits)
    assert probs.shape == logits.shape
    assert torch.allclose(probs.sum(dim=1), torch.ones(16), atol=1e-6)
    assert (probs >= 0).all()
    assert torch.equal(probs.argmax(1), logits.argmax(1))


def test_ce_probabilities_are_softmax(batch):
    logits, _ = batch
    assert torch.allclose(ClassificationLoss("ce", C).probabilities(logits), logits.softmax(1))


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        ClassificationLoss("mse", C)
