"""`visiontune shift` end to end on a tiny run, with its test images colour-inverted as the target."""

from __future__ import annotations

import json
import shutil

import pytest
from markupsafe import escape
from typer.testing import CliRunner

from visiontune.cli.main import app
from visiontune.errors import UserError
from visiontune.ood.detector import OOD_FILE
from visiontune.shift.report import shift_report


def test_labelled_target_report_has_auroc_accuracy_per_domain_embedding_and_pairs(run, inverted):
    result = shift_report(run, inverted, workers=0)
    out = run.dir / "shift" / inverted.name
    assert result["report"] == str(out / "report.html")
    saved = json.loads((out / "shift.json").read_text())
    assert saved["auroc"] == result["auroc"] and set(saved["auroc"]) == {"energy", "knn"}
    assert all(0 <= v <= 1 for v in saved["auroc"].values())
    tested = len(run.split_samples("test"))
    assert saved["source_split"] == "test" and saved["images"] == {"source": tested, "target": tested}
    for domain in ("source", "target"):
        block = saved["accuracy"][domain]
        assert block["images"] == tested and block["ci95"][0] <= block["accuracy"] <= block["ci95"][1]
    assert [row["class"] for row in saved["per_class"]] == ["blue", "red"]
    assert 0 <= saved["flagged"]["source"] <= 1 and 0 <= saved["flagged"]["target"] <= 1
    assert 1 <= len(saved["pairs"]) <= 4 and all((out / p[side]["overlay"]).is_file()
                                                  for p in saved["pairs"] for side in ("target", "source"))
    html = (out / "report.html").read_text()
    assert 'alt="embedding" src="data:image/png;base64,' in html and (out / "embedding.png").is_file()
    assert html.count('alt="target Grad-CAM"') == len(saved["pairs"]) and str(escape(saved["reading"])) in html
    assert f"{saved['auroc']['knn']:.3f}" in html
    assert [p.name for p in (run.dir / "shift").iterdir()] == [inverted.name]  # no staging folder left


def test_cli_on_unmatched_classes_treats_the_target_as_unlabelled(run, inverted, tmp_path):
    target = tmp_path / "xray"
    shutil.copytree(inverted / "blue", target / "cyan")
    shutil.copytree(inverted / "red", target / "magenta")
    result = CliRunner().invoke(app, ["shift", str(run.dir), "--target", str(target), "--name", "xr",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "OOD AUROC, target vs source: energy" in result.output and "source accuracy" in result.output
    assert "target accuracy" not in result.output and "cyan, magenta" in result.output
    saved = json.loads((run.dir / "shift" / "xr" / "shift.json").read_text())
    assert saved["unknown_classes"] == ["cyan", "magenta"] and saved["target_labelled"] == 0
    assert saved["accuracy"]["target"] is None
    assert sum(row["target_share"] for row in saved["per_class"]) == pytest.approx(1.0)
    assert f"written: {run.dir / 'shift' / 'xr' / 'report.html'}" in result.output
    assert "Predicted classes per domain" in (run.dir / "shift" / "xr" / "report.html").read_text()


def test_flat_folder_without_fitted_scorers_is_unlabelled_and_energy_only(run, inverted, tmp_path):
    target = tmp_path / "flat"
    target.mkdir()
    for path in inverted.rglob("*.png"):
        shutil.copy(path, target / f"{path.parent.name}_{path.name}")
    hidden = run.dir / "ood.json.hidden"
    (run.dir / OOD_FILE).rename(hidden)
    try:
        result = shift_report(run, target, name="flat", workers=0)
    finally:
        hidden.rename(run.dir / OOD_FILE)
    assert list(result["auroc"]) == ["energy"] and "flagged" not in result
    assert result["target_labelled"] == 0 and result["unknown_classes"] == []
    assert any("visiontune ood fit" in note for note in result["notes"])
    assert result["images"]["target"] == len(list(target.iterdir()))


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "no images found"),
    (lambda root: None, "does not exist"),
    (lambda root: (root.mkdir(), (root / "broken.png").write_bytes(b"not an image")), "could be read"),
])
def test_bad_targets_stop_with_a_message_and_write_nothing(run, tmp_path, make, message):
    target = tmp_path / "bad"
    make(target)
    before = sorted(p.name for p in (run.dir / "shift").iterdir()) if (run.dir / "shift").exists() else []
    result = CliRunner().invoke(app, ["shift", str(run.dir), "--target", str(target), "--workers", "0"])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert message in str(result.exception)
    after = sorted(p.name for p in (run.dir / "shift").iterdir()) if (run.dir / "shift").exists() else []
    assert after == before
