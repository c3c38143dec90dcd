"""uint8 transforms plus the device normaliser give the same tensors as the float transforms."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.transforms import v2

from tests.conftest import COLOURS, colour_image
from visiontune.data.transforms import (
    AUGMENT_PRESETS,
    CROP_SCALES,
    Preprocessing,
    RandomQuarterTurn,
)

PRE = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)
# Half a uint8 step, in normalised units: the most the erasing colour can differ by rounding.
HALF_STEP = 0.5 / 255 / min(PRE.std) + 1e-5


def test_normalizer_matches_formula_and_keeps_layout() -> None:
    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = PRE.normalizer()(batch)
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1), torch.tensor(PRE.std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, (batch.float() / 255 - mean) / std, atol=1e-6, rtol=0)


def test_normalizer_passes_float_batches_through() -> None:
    already = torch.randn(2, 3, 4, 4)
    assert PRE.normalizer()(already) is already


@pytest.mark.parametrize("preset", ["none", "light", "medium"])
def test_uint8_train_path_equals_float_path_with_the_same_seed(preset: str) -> None:
    image = colour_image(COLOURS["red"], seed=3, size=(45, 37))
    torch.manual_seed(7)
    expected = PRE.train_transform(preset)(image)
    torch.manual_seed(7)
    raw = PRE.train_transform(preset, normalize=False)(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    torch.testing.assert_close(PRE.normalizer()(raw[None])[0], expected.as_subclass(torch.Tensor), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_every_preset_yields_uint8_from_pil_and_from_resized_tensors(preset: str) -> None:
    image = colour_image(COLOURS["blue"], seed=1)
    transform = PRE.train_transform(preset, normalize=False)
    for source in (image, v2.functional.pil_to_tensor(image)):
        out = transform(source)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 32, 32)


def test_uint8_erasing_writes_the_mean_colour_like_float_erasing_writes_zero() -> None:
    def erasing(normalize: bool) -> v2.RandomErasing:
        step = next(t for t in PRE.train_transform("heavy", normalize).transforms if isinstance(t, v2.RandomErasing))
        step.p = 1.0
        return step

    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    expected = erasing(True)(PRE.normalizer()(white[None])[0])
    torch.manual_seed(0)
    got = PRE.normalizer()(erasing(False)(white)[None])[0]
    erased = expected == 0
    assert 0 < erased.sum() < erased.numel()
    assert (got - expected).abs().max() <= HALF_STEP


# The interpolation of each real backbone family (timm's pretrained configs; most are bicubic),
# read without building the models. The tiny test model is bilinear, which hid issue 12.1.
FAMILIES = ("resnet18", "resnet50", "tf_efficientnet_lite0", "convnext_tiny", "vit_tiny_patch16_224",
            "mobilenetv3_large_100", "test_resnet")
INTERPOLATIONS = sorted({timm.models.get_pretrained_cfg(name).interpolation for name in FAMILIES} | {"nearest", "random"})


def _every_trivial_augment_op(transform: v2.Compose):
    """The transform once per TrivialAugment op, so no op is left to chance (heavy only)."""
    trivial = next((t for t in transform.transforms if isinstance(t, v2.TrivialAugmentWide)), None)
    if trivial is None:
        yield transform
        return
    space = dict(trivial._AUGMENTATION_SPACE)
    assert len(space) > 10
    for op, entry in space.items():
        trivial._AUGMENTATION_SPACE = {op: entry}
        yield transform


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
@pytest.mark.parametrize("normalize", [False, True])
def test_every_preset_runs_with_every_backbone_interpolation(preset: str, interpolation: str, normalize: bool) -> None:
    pre = Preprocessing(32, PRE.mean, PRE.std, interpolation, 0.875)
    image = colour_image(COLOURS["green"], seed=2)
    torch.manual_seed(0)
    for transform in _every_trivial_augment_op(pre.train_transform(preset, normalize)):
        for source in (image, v2.functional.pil_to_tensor(image)):
            out = transform(source)
            assert tuple(out.shape) == (3, 32, 32)


def test_quarter_turns_are_exact_and_all_four_occur() -> None:
    image = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 4, 4)
    outputs = [RandomQuarterTurn()(image) for _ in range(64)]
    turns = [[k for k in range(4) if torch.equal(out, torch.rot90(image, k, (-2, -1)))] for out in outputs]
    assert all(len(matches) == 1 for matches in turns)  # each output is exactly one of the four turns
    assert {matches[0] for matches in turns} == {0, 1, 2, 3}


@pytest.mark.parametrize("preset, crop_scale, expected", [("light", None, CROP_SCALES["light"]),
                                                          ("texture", None, 0.8), ("light", 0.9, 0.9)])
def test_crop_scale_defaults_per_preset_and_can_be_raised(preset: str, crop_scale, expected: float) -> None:
    steps = PRE.train_transform(preset, crop_scale=crop_scale).transforms
    crop = next(t for t in steps if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (expected, 1.0)


def test_squash_keeps_the_ends_of_an_elongated_image_that_center_crops_away() -> None:
    pixels = torch.zeros(3, 32, 96, dtype=torch.uint8)
    pixels[:, :, :10] = 255  # a bright mark at the left end, like a defect at a tile's edge
    image = v2.functional.to_pil_image(pixels)
    for mode, kept in (("center", False), ("squash", True)):
        pre = Preprocessing(32, PRE.mean, PRE.std, "bilinear", 1.0, mode)
        out = pre.eval_transform(normalize=False)(image)
        assert tuple(out.shape) == (3, 32, 32)
        assert bool((out[:, :, :2] > 200).all()) == kept
