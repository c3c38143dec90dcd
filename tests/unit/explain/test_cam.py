"""Grad-CAM's default layer on timm CNNs, its refusal of token models, and the overlay image."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError
from visiontune.explain.cam import default_layer, gradcam
from visiontune.explain.overlay import model_view, overlay


def timm_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3).eval()


@pytest.mark.parametrize(("name", "layer"), [("test_resnet", "layer4"), ("test_efficientnet", "blocks.4")])
def test_default_layer_is_the_last_stage_and_gives_input_sized_maps(name, layer):
    model = timm_model(name)
    assert default_layer(model) == layer
    heat = gradcam(model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), [0, 2])
    assert heat.shape == (2, 64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1


def test_frozen_parameters_still_give_gradients():
    model = timm_model("test_efficientnet")
    model.requires_grad_(False)
    heat = gradcam(model, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), [1])
    assert heat.max() == pytest.approx(1.0)  # a non-empty map, min-max scaled


def test_models_without_a_feature_map_point_to_lime():
    with pytest.raises(UserError, match=r"'blocks\.5' outputs \(1, \d+, 64\).*--method lime"):
        gradcam(timm_model("test_vit"), torch.zeros(1, 3, 160, 160), [0])
    with pytest.raises(UserError, match="no convolutional layer.*--method lime"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))


def test_models_without_feature_info_use_their_last_conv():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    assert default_layer(model) == "2"
    assert gradcam(model, torch.rand(1, 3, 16, 16), [1]).shape == (1, 16, 16)
    with pytest.raises(UserError, match="no layer named 'nope'"):
        gradcam(model, torch.rand(1, 3, 16, 16), [1], layer="nope")


def test_model_view_is_the_centre_crop_the_model_saw():
    pre = Preprocessing(
        input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear", crop_pct=0.8
    )
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)  # 32 / 0.8 = 40: no resize
    view = model_view(pre.eval_transform()(Image.fromarray(pixels))[None], pre)
    np.testing.assert_array_equal(view[0], pixels[4:36, 4:36])


def test_overlay_colours_only_where_there_is_heat():
    view = np.full((8, 8, 3), 100, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:4] = 1.0
    drawn = np.asarray(overlay(view, heat))
    assert drawn.shape == (8, 8, 3)
    np.testing.assert_array_equal(drawn[4:], view[4:])
    assert (drawn[:4, :, 0] > drawn[:4, :, 2] + 50).all()  # the hot end of 'jet' is red
