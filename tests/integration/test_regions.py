"""`visiontune regions` as a user runs it: crops and a CSV from generated tiles, one-line errors."""

from __future__ import annotations

import csv

import pytest

from tests.integration.test_cli import cli
from visiontune.detect.synthetic import make_tiles


@pytest.mark.slow
def test_regions_writes_a_training_csv_and_explains_bad_options(tmp_path):
    annotations = make_tiles(tmp_path / "tiles", 4, size=64, seed=3)
    images = tmp_path / "tiles" / "images"
    done = cli("regions", images, "--boxes", annotations, "--out", tmp_path / "out", "--proposals", "sliding",
               "--max-proposals", "40", "--size", "32", "--context", "4", "--val-fraction", "0.25",
               "--test-fraction", "0.25")
    assert done.returncode == 0, done.stderr
    assert "train on them with: visiontune train" in done.stdout
    assert "proposals: 40 per image; true boxes they reach at IoU >= 0.5: crack " in done.stdout
    with (tmp_path / "out" / "regions.csv").open(newline="") as handle:
        assert {row["split"] for row in csv.DictReader(handle)} == {"train", "val", "test"}
    bad = cli("regions", images, "--boxes", annotations, "--out", tmp_path / "bad", "--size", "32")
    assert bad.returncode == 2 and "twice the context" in bad.stderr and "Traceback" not in bad.stderr
