"""Figures with class names in any script: drawn without glyph warnings cluttering a run's log."""

from __future__ import annotations

import warnings

from visiontune.evaluation.plots import confusion_matrix_png, prediction_grid_png


def test_cjk_class_names_draw_without_glyph_warnings(tmp_path):
    labels = ["猫", "犬", "고양이"]
    matrix = {"labels": labels, "counts": [[2, 1, 0], [0, 3, 0], [1, 0, 2]],
              "normalized": [[0.67, 0.33, 0], [0, 1, 0], [0.33, 0, 0.67]]}
    rows = [{"path": str(tmp_path / "missing.png"), "actual": "猫", "predicted": "犬", "probability": 0.9, "loss": 2.3}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion_matrix_png(matrix, tmp_path / "cm.png")
        prediction_grid_png(rows, "top losses", tmp_path / "grid.png", 10_000)
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert (tmp_path / "cm.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0
