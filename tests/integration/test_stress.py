"""`evaluate --stress` on a run that can only tell its classes apart by colour."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import visiontune
from tests.conftest import TINY_OPTIONS, colour_image
from visiontune.cli.main import app
from visiontune.evaluation.stress import PERTURBATIONS

# Hues of (nearly) equal luminance, 0.299 R + 0.587 G + 0.114 B = 117-118: in grayscale the three
# classes are the same noisy grey, so only colour separates them.
EQUAL_LUMINANCE = {"red": (220, 75, 75), "green": (70, 150, 70), "blue": (100, 100, 255)}


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stress")
    for k, (name, colour) in enumerate(EQUAL_LUMINANCE.items()):
        (root / "data" / name).mkdir(parents=True)
        for i in range(16):
            colour_image(colour, seed=100 * k + i).save(root / "data" / name / f"{name}_{i:02d}.png")
    options = {**TINY_OPTIONS, "epochs": 3, "lr": 1e-2, "test_fraction": 0.25}
    return visiontune.fit(root / "data", out=str(root / "run"), **options)


def test_stress_measures_each_perturbation_and_colour_matters(colour_run):
    result = colour_run.evaluate("test", stress=True, workers=0)
    stress = result["stress"]
    by_name = {row["name"]: row for row in stress["perturbations"]}
    assert list(by_name) == list(PERTURBATIONS)
    assert by_name["none"]["accuracy"] == result["accuracy"] and by_name["none"]["drop"] == 0
    assert by_name["grayscale"]["accuracy"] < by_name["none"]["accuracy"]
    for row in stress["perturbations"]:
        assert row["images"] == result["n"]
        assert row["ci"][0] <= row["accuracy"] <= row["ci"][1]
    assert "colour" in stress["reading"]
    out = colour_run.dir / "eval" / "test"
    assert json.loads((out / "stress.json").read_text()) == stress
    assert result["figures"]["stress"] == "stress.png" and (out / "stress.png").stat().st_size > 0
    report = (colour_run.dir / "report.html").read_text()
    assert "Stress tests" in report and 'alt="stress tests"' in report


def test_cli_prints_the_stress_table(colour_run):
    result = CliRunner().invoke(app, ["evaluate", str(colour_run.dir), "--stress", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "accuracy under perturbation" in result.output
    for name in ("grayscale", "patch_shuffle", "mask_background"):
        assert name in result.output
    assert "Biggest drops" in result.output
