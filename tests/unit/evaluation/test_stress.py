"""Stress perturbations: deterministic, size- and mode-preserving, and doing what their names say."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from tests.conftest import colour_image
from visiontune.evaluation.plots import stress_png
from visiontune.evaluation.stress import GREY, PERTURBATIONS, Perturbed, reading


@pytest.fixture
def image() -> Image.Image:
    """A colourful image with structure: a noisy red field with a green square and a blue bar."""
    pixels = np.asarray(colour_image((200, 50, 50), seed=1, size=(50, 42))).copy()
    pixels[10:30, 12:30] = (40, 190, 40)
    pixels[:, 40:44] = (30, 30, 220)
    return Image.fromarray(pixels)


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_each_perturbation_is_deterministic_and_keeps_size_and_mode(name, image):
    first, second = PERTURBATIONS[name](image.copy()), PERTURBATIONS[name](image.copy())
    assert first.tobytes() == second.tobytes()
    assert first.size == image.size and first.mode == "RGB"
    if name != "none":
        assert first.tobytes() != image.tobytes()


def test_none_leaves_the_image_alone(image):
    assert PERTURBATIONS["none"](image).tobytes() == image.tobytes()


def test_grayscale_has_equal_channels(image):
    pixels = as_array(PERTURBATIONS["grayscale"](image))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_invert_twice_is_the_original(image):
    invert = PERTURBATIONS["invert"]
    assert (as_array(invert(image)) == 255 - as_array(image)).all()
    assert invert(invert(image)).tobytes() == image.tobytes()


def test_edges_are_dark_lines_on_white(image):
    pixels = as_array(PERTURBATIONS["edges"](image))[..., 0]
    assert np.median(pixels) > 200  # mostly white
    assert pixels[10:30, 11].mean() < pixels[20, 20]  # the green square's left edge is darker than its inside


def test_patch_shuffle_moves_tiles_and_keeps_their_contents(image):
    shuffled = as_array(PERTURBATIONS["patch_shuffle"](image))
    original = as_array(image)
    assert sorted(map(tuple, shuffled.reshape(-1, 3))) == sorted(map(tuple, original.reshape(-1, 3)))
    h, w = image.height // 4, image.width // 4
    tiles = {original[r * h:(r + 1) * h, c * w:(c + 1) * w].tobytes() for r in range(4) for c in range(4)}
    moved = {shuffled[r * h:(r + 1) * h, c * w:(c + 1) * w].tobytes() for r in range(4) for c in range(4)}
    assert moved == tiles and not (shuffled == original).all()


def test_mask_centre_greys_the_centre_and_leaves_corners(image):
    masked = as_array(PERTURBATIONS["mask_centre"](image))
    original = as_array(image)
    h, w = image.height, image.width
    assert (masked[h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] == GREY).all()
    for rows, cols in ((slice(0, h // 4), slice(0, w // 4)), (slice(-h // 4, None), slice(-w // 4, None))):
        assert (masked[rows, cols] == original[rows, cols]).all()


def test_mask_background_keeps_only_the_centre(image):
    masked = as_array(PERTURBATIONS["mask_background"](image))
    original = as_array(image)
    h, w = image.height, image.width
    centre = (slice(h // 4, h // 4 + h // 2), slice(w // 4, w // 4 + w // 2))
    assert (masked[centre] == original[centre]).all()
    assert (masked[: h // 4] == GREY).all() and (masked[:, -(w // 4):] == GREY).all()


def test_jpeg_changes_pixels_but_not_size(image):
    compressed = PERTURBATIONS["jpeg"](image)
    assert compressed.size == image.size
    assert np.abs(as_array(compressed) - as_array(image)).mean() > 1


def test_blur_and_noise_change_detail_not_the_mean_colour(image):
    for name in ("blur", "noise"):
        changed = as_array(PERTURBATIONS[name](image))
        assert abs(changed.mean() - as_array(image).mean()) < 3, name


def test_perturbed_transform_pickles_for_decoding_workers(image):
    transform = pickle.loads(pickle.dumps(Perturbed(PERTURBATIONS["patch_shuffle"], np.asarray)))
    assert (transform(image) == as_array(PERTURBATIONS["patch_shuffle"](image))).all()


def row(name: str, drop: float) -> dict:
    return {"name": name, "accuracy": 0.9 - drop, "ci": [0.8 - drop, 1.0 - drop], "drop": drop}


def test_reading_names_what_the_biggest_drops_say():
    rows = [row("none", 0), row("grayscale", 0.5), row("invert", 0.4), row("edges", 0.3), row("patch_shuffle", 0.0)]
    text = reading(rows)
    assert text.startswith("Biggest drops: grayscale (-0.50), invert (-0.40), edges (-0.30)")
    assert "relies on colour" in text and "texture more than shape" in text
    assert "holds under every perturbation" in reading([row("none", 0), row("blur", 0.02)])


def test_stress_figure_is_written(tmp_path):
    stress = {"perturbations": [row("none", 0), row("grayscale", 0.5)], "clean_accuracy": 0.9, "chance": 0.5}
    stress_png(stress, tmp_path / "stress.png")
    assert (tmp_path / "stress.png").stat().st_size > 0
