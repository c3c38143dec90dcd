"""Logits and penultimate features in one pass: the same logits as the model, and the same
features from the exported ONNX graph as from torch."""

from __future__ import annotations

import timm
import torch

from visiontune.inference.onnx import RUN_OUTPUTS, OnnxModel, export_model
from visiontune.models.penultimate import LogitsAndFeatures, logits_and_features


def test_logits_equal_the_models_and_features_are_what_its_head_reads(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features = logits_and_features(model, images)
        torch.testing.assert_close(logits, model(images))
        torch.testing.assert_close(model.get_classifier()(features), logits)
    assert features.shape == (4, model.num_features)

    path = export_model(LogitsAndFeatures(model), tmp_path / "model.onnx", 32, RUN_OUTPUTS)
    onnx_logits, onnx_features = OnnxModel(path).logits_and_features(images)
    torch.testing.assert_close(onnx_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx_features, features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(OnnxModel(path)(images), logits, atol=1e-4, rtol=1e-4)  # logits alone, as before
