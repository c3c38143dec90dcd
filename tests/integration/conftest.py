"""Fixtures of the domain-shift tests (OOD flag, shift report): a tiny colour run and its test
images in another domain. Module-scoped, so each test module trains its own run."""

from __future__ import annotations

import pytest
from PIL import Image, ImageOps

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    data = write_class_folders(root / "data", {"blue": 20, "red": 20})
    return visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 3, "lr": 1e-2})


@pytest.fixture(scope="module")
def inverted(run, tmp_path_factory):
    """The run's test images, colour-inverted: the same classes, another domain."""
    root = tmp_path_factory.mktemp("inverted")
    for path, label in run.split_samples("test"):
        (root / label).mkdir(exist_ok=True)
        with Image.open(path) as image:
            ImageOps.invert(image.convert("RGB")).save(root / label / path.name)
    return root
