"""Explanations on a task whose answer is known: the class is a bright square in the top-left corner.

A tiny test_resnet is trained once for the module. Images are made at the size the evaluation
transform resizes to, so the square lands unscaled at the top-left of what the model sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import visiontune
from tests.conftest import TINY_MODEL, TINY_OPTIONS
from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError
from visiontune.explain.cam import gradcam
from visiontune.explain.explainer import explain
from visiontune.explain.lime import lime_map
from visiontune.explain.overlay import model_view

SIZE = 192  # model input: test_resnet's last stage is a 6 x 6 map of 32-pixel cells
SQUARE = 64  # 2 x 2 cells, aligned with them; 1/9 of the image
PER_CLASS = 40


class SquareTask:
    def __init__(self, root: Path) -> None:
        crop_pct = Preprocessing.from_model(timm.create_model(TINY_MODEL, pretrained=False), SIZE).crop_pct
        self.side = round(SIZE / crop_pct)  # the evaluation resize is then a no-op
        self.offset = round((self.side - SIZE) / 2)  # where the centre crop starts
        for label in ("plain", "square"):
            (root / "data" / label).mkdir(parents=True)
            for i in range(PER_CLASS):
                image = self.image(label == "square", seed=2 * i + (label == "square"))
                image.save(root / "data" / label / f"{i:03d}.png")
        self.run = visiontune.fit(
            root / "data", out=str(root / "run"),
            **{**TINY_OPTIONS, "image_size": SIZE, "epochs": 5, "freeze_epochs": 0, "lr": 3e-3},
        )
        self.model = self.run.load_model()
        outline = np.zeros((self.side, self.side, 3), dtype=np.uint8)
        outline[self._square] = 255
        self.mask = (self.run.preprocessing.eval_transform()(Image.fromarray(outline))[0] > 0).numpy()

    @property
    def _square(self) -> tuple[slice, slice]:
        return slice(self.offset, self.offset + SQUARE), slice(self.offset, self.offset + SQUARE)

    def image(self, square: bool, seed: int) -> Image.Image:
        """Dark noise, with a white square in the top-left corner for the positive class."""
        pixels = np.random.default_rng(seed).integers(0, 60, (self.side, self.side, 3), dtype=np.uint8)
        if square:
            pixels[self._square] = 255
        return Image.fromarray(pixels)

    def batch(self, n: int, square: bool = True) -> torch.Tensor:
        transform = self.run.preprocessing.eval_transform()
        return torch.stack([transform(self.image(square, seed=10_000 + i)) for i in range(n)])


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> SquareTask:
    return SquareTask(tmp_path_factory.mktemp("square"))


def test_the_model_learned_the_square(task):
    assert task.run.summary["val"]["accuracy"] == 1.0
    assert task.mask.sum() == SQUARE * SQUARE  # the whole square survives the crop, unscaled
    assert task.mask[:SQUARE, :SQUARE].all()
    with torch.no_grad():
        square = task.model(torch.cat([task.batch(4), task.batch(4, square=False)])).argmax(dim=1)
    assert square.tolist() == [1] * 4 + [0] * 4


def test_gradcam_puts_most_heat_inside_the_square(task):
    heat = gradcam(task.model, task.batch(6), targets=[1] * 6)
    inside = (heat * task.mask).sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    share = task.mask.mean()  # 1/9: where heat spread evenly would put it
    assert (inside > 0.5).all(), inside
    assert (inside > 4 * share).all(), inside


def test_lime_weighs_the_square_and_is_reproducible(task):
    views = model_view(task.batch(2), task.run.preprocessing)
    heat = lime_map(task.model, views, [1, 1], task.run.preprocessing, num_samples=128, batch_size=32)
    assert heat.shape == (2, SIZE, SIZE) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    for one in heat:  # quickshift cuts the square into several superpixels, which share the weight
        assert (one * task.mask).sum() / one.sum() > 0.5
        assert one[task.mask].mean() > 10 * one[~task.mask].mean()
    again = lime_map(task.model, views[:1], [1], task.run.preprocessing, num_samples=128, batch_size=32)
    np.testing.assert_array_equal(again[0], heat[0])


@pytest.fixture
def images(task, tmp_path) -> list[Path]:
    """Two squares, one plain image and a corrupt file, in that order."""
    paths = [tmp_path / "in" / name for name in ("sq_a.png", "sq_b.png", "plain.png", "broken.png")]
    paths[0].parent.mkdir()
    task.image(True, seed=20_000).save(paths[0])
    task.image(True, seed=20_001).save(paths[1])
    task.image(False, seed=20_002).save(paths[2])
    paths[3].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return paths


def test_explain_writes_one_overlay_per_readable_image(task, images, tmp_path):
    records = explain(task.run, images, out_dir=tmp_path / "out")
    assert [r["path"] for r in records] == [str(p) for p in images]
    assert [r.get("label") for r in records] == ["square", "square", "plain", None]
    assert [r.get("target") for r in records] == ["square", "square", "plain", None]
    assert "not a readable image" in records[3]["skipped"] and "overlay" not in records[3]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["plain_gradcam.png", "sq_a_gradcam.png", "sq_b_gradcam.png"]
    for record in records[:3]:
        assert 0.5 < record["probability"] <= 1 and record["target_probability"] == record["probability"]
        with Image.open(record["overlay"]) as png:
            assert png.size == (SIZE, SIZE) and png.mode == "RGB"


def test_explain_a_named_target_with_lime(task, images, tmp_path):
    records = explain(
        task.run.dir, images[:1], method="lime", target="plain", out_dir=tmp_path, num_samples=32
    )
    assert records[0]["label"] == "square" and records[0]["target"] == "plain"
    assert records[0]["target_probability"] == pytest.approx(1 - records[0]["probability"], abs=1e-6)
    assert Path(records[0]["overlay"]) == tmp_path / "sq_a_lime.png"


def test_explain_folders_and_repeated_stems_into_the_run_directory(task, images):
    records = explain(task.run, [images[0].parent, images[0]])
    names = [Path(r["path"]).name for r in records]
    assert names == ["broken.png", "plain.png", "sq_a.png", "sq_b.png", "sq_a.png"]  # a folder is sorted
    assert Path(records[2]["overlay"]) == task.run.dir / "explain" / "sq_a_gradcam.png"
    assert Path(records[4]["overlay"]) == task.run.dir / "explain" / "sq_a_2_gradcam.png"  # not overwritten


def test_explain_rejects_unknown_targets_and_methods(task, images):
    with pytest.raises(UserError, match=r"unknown target class 'sqare'\. Did you mean: square\?"):
        explain(task.run, images, target="sqare")
    with pytest.raises(UserError, match="unknown explanation method 'shap'"):
        explain(task.run, images, method="shap")
