"""The OOD flag end to end on a tiny run: fitted by `train`, carried by predict and evaluate, refit
by `visiontune ood fit`, ignored (with a warning) once the checkpoint changes."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from visiontune.cli.main import app
from visiontune.errors import UserError
from visiontune.inference.engine import plan_inference
from visiontune.ood.detector import OOD_FILE, OODDetector
from visiontune.ood.fit import extract, fit_ood, load_ood


def test_train_fits_the_scorers_and_the_threshold_keeps_95_percent_of_val(run):
    record = json.loads((run.dir / OOD_FILE).read_text())
    assert record["fitted_on"] == {"bank": "train", "thresholds": "val"}
    assert record["train_images"] == len(run.split_paths("train")) and record["primary"] == "knn"
    detector = load_ood(run)
    model = run.load_model()
    plan = plan_inference("cpu", backend="torch", workers=0)
    val = extract(model, plan, run.preprocessing.eval_transform(), [str(p) for p in run.split_paths("val")],
                  run.config.max_pixels)
    scores = detector.score(val.logits, val.features)
    assert (scores["knn"] <= detector.thresholds_["knn"]).mean() >= 0.95
    assert record["val_flagged"] == pytest.approx(detector.flag(scores).mean())


def test_predict_rows_carry_the_score_and_flag(run, inverted):
    rows = run.predict([str(inverted)], workers=0).rows
    assert rows and all(isinstance(r["ood_score"], float) and isinstance(r["ood"], bool) for r in rows)
    out = run.dir / "preds.csv"
    run.predict([str(inverted)], out=out, workers=0)
    with out.open() as handle:
        written = list(csv.DictReader(handle))
    assert [float(r["ood_score"]) for r in written] == pytest.approx([r["ood_score"] for r in rows], rel=1e-5)


def test_evaluate_other_folder_reports_flag_rate_and_auroc_of_each_scorer(run, inverted):
    result = run.evaluate(data=str(inverted), workers=0)
    block = result["ood"]
    assert set(block["auroc"]) == {"energy", "knn"}
    assert all(0 <= v <= 1 for v in block["auroc"].values())
    assert block["images"] == result["n"] and 0 <= block["flagged_rate"] <= 1
    assert "reference_flagged_rate" in block
    with (run.dir / "eval" / result["name"] / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert np.mean([r["ood"] == "True" for r in rows]) == pytest.approx(block["flagged_rate"])
    report = (run.dir / "report.html").read_text()
    assert f'id="ood-{result["name"]}"' in report and f"{block['auroc']['knn']:.3f}" in report
    in_domain = run.evaluate("test", workers=0)["ood"]
    assert "auroc" not in in_domain and in_domain["images"] == len(run.split_paths("test"))


def test_evaluate_cli_prints_the_flag_rate_and_auroc(run, inverted):
    result = CliRunner().invoke(app, ["evaluate", str(run.dir), "--data", str(inverted), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "images flagged (knn score above" in result.output
    assert "OOD AUROC vs in-domain" in result.output and "energy" in result.output


def test_ood_fit_cli_refits_with_another_k(run):
    result = CliRunner().invoke(app, ["ood", "fit", str(run.dir), "--k", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "k=2" in result.output and "written:" in result.output
    assert OODDetector.load(run.dir).k_ == 2
    bad = CliRunner().invoke(app, ["ood", "fit", str(run.dir), "--k", "1000", "--workers", "0"])
    assert bad.exit_code != 0 and isinstance(bad.exception, UserError) and "exceeds" in str(bad.exception)
    assert OODDetector.load(run.dir).k_ == 2  # the failed refit left the fitted scorers alone


def test_scores_fitted_for_another_checkpoint_are_ignored_with_a_warning(run, caplog, tmp_path):
    fit_ood(run, workers=0)
    record = json.loads((run.dir / OOD_FILE).read_text())
    (run.dir / OOD_FILE).write_text(json.dumps({**record, "checkpoint_sha256": "0" * 64}))
    try:
        with caplog.at_level(logging.WARNING):
            rows = run.predict([str(p) for p in run.split_paths("val")], workers=0).rows
        assert rows and "ood" not in rows[0]
        assert "fitted for another checkpoint" in caplog.text
    finally:
        (run.dir / OOD_FILE).write_text(json.dumps(record))
