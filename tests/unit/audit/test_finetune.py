"""Per-fold fine-tuning for the audit: each fold trains on the other folds only (with a validation
share drawn from them), predicts its held-out rows once, and the fold runs leave nothing behind."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from visiontune.audit import finetune
from visiontune.errors import UserError


def test_every_row_is_scored_by_the_fold_that_held_it_out_and_never_trained_on(tmp_path, monkeypatch):
    paths = [str(tmp_path / f"img{i}.png") for i in range(12)]
    labels = np.array([0] * 6 + [1] * 6)
    seen: list[dict] = []

    def fake_fit(source, *, config, progress, out, seed):
        with open(source, newline="") as handle:
            rows = list(csv.DictReader(handle))
        seen.append({"train": {r["path"] for r in rows if r["split"] == "train"},
                     "val": {r["path"] for r in rows if r["split"] == "val"}, "epochs": config.epochs})

        def predict(asked, top_k, **_):  # "dog" is certain for images it trained on: a leak would show
            trained = seen[-1]["train"] | seen[-1]["val"]
            return SimpleNamespace(rows=[
                {"path": p, "top1_label": "dog", "top1_probability": 1.0 if str(Path(p).resolve()) in trained else 0.3,
                 "top2_label": "cat", "top2_probability": 0.0 if str(Path(p).resolve()) in trained else 0.7}
                for p in asked])
        return SimpleNamespace(labels=["cat", "dog"], predict=predict, summary={"best_epoch": 1, "val": {"accuracy": 0.5}})

    monkeypatch.setattr(finetune, "fit", fake_fit)
    recipe = finetune.fold_recipe(None, "test_resnet", {"epochs": 2, "weights": None})
    folds, records = finetune.fine_tuned_probabilities(paths, labels, ["cat", "dog"], recipe, tmp_path, folds=3)

    assert folds.folds == 3 and [r["held_out"] for r in records] == [4, 4, 4]
    assert np.allclose(folds.pred_probs, [[0.7, 0.3]] * 12)  # no row scored by a model that trained on it
    for fold in seen:
        assert fold["epochs"] == 2 and fold["val"] and not fold["train"] & fold["val"]
        assert len(fold["train"]) + len(fold["val"]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the fold sources and runs are removed


def test_a_runs_recipe_keeps_its_training_options_but_not_its_data_out_or_curation(tmp_path, monkeypatch):
    config = SimpleNamespace(model_dump=lambda: {
        "data": "/old", "out": "/runs/x", "exclude": "ex.csv", "relabel": None, "label_regex": None,
        "model": "resnet50", "epochs": 9, "lr": 3e-4, "focal_alpha": -1.0})
    monkeypatch.setattr(finetune, "ClassifierRun", lambda run: SimpleNamespace(config=config))
    recipe = finetune.fold_recipe("RUN", None, {"epochs": 3, "device": "cpu", "weights": None,
                                                "image_size": Path("x")})
    assert recipe == {"model": "resnet50", "epochs": 3, "lr": 3e-4, "focal_alpha": -1.0, "device": "cpu",
                      "image_size": "x", "report": False}
    assert finetune.fold_recipe(None, "m", {"weights": Path("/w.safetensors")})["weights"] == "/w.safetensors"


def test_validation_rows_take_a_share_of_each_class_but_never_all_of_it():
    train = np.arange(10)
    labels = np.array([0] * 8 + [1] * 2)
    val = finetune._validation_rows(train, labels, 0.25, seed=0)
    assert (labels[val] == 0).sum() == 2 and (labels[val] == 1).sum() == 1


def test_a_file_unreadable_at_prediction_time_is_one_message(tmp_path, monkeypatch):
    run = SimpleNamespace(labels=["a", "b"], predict=lambda paths, **_: SimpleNamespace(rows=[]))
    with pytest.raises(UserError, match="changed during the audit"):
        finetune._probabilities(run, [str(tmp_path / "x.png")], ["a", "b"], {})
