"""Both evaluation layouts, the mask rule, bad files skipped with reasons, and the CLI's messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visiontune import anomaly
from visiontune.anomaly.data import (
    defect_images,
    good_images,
    labelled_images,
    load_mask,
)
from visiontune.cli.anomaly import anomaly_app
from visiontune.errors import UserError

from ...conftest import write_odd_and_bad_files
from .conftest import write_plain

SMALL = dict(backbone="test_resnet", pretrained=False, image_size=64, workers=0, coreset_ratio=0.1)
runner = CliRunner()


def test_mvtec_layout_pairs_images_with_their_masks(mvtec: Path) -> None:
    images = labelled_images(mvtec)
    assert {i.defect for i in images} == {"good", "scratch"}
    scratched = [i for i in images if i.is_anomalous]
    assert all(i.mask is not None and i.mask.name == f"{i.path.stem}_mask.png" for i in scratched)
    assert all(i.mask is None for i in images if not i.is_anomalous)
    assert good_images(mvtec) == sorted((mvtec / "train" / "good").glob("*.png"))


def test_plain_layout_with_masks_in_a_parallel_folder(tmp_path: Path) -> None:
    root = write_plain(tmp_path / "plain")
    (root / "scratch" / "unmasked.png").write_bytes((root / "scratch" / "s0.png").read_bytes())
    images = {i.path.name: i for i in labelled_images(root)}
    assert images["s1.png"].mask == root / "masks" / "scratch" / "s1.png"
    assert images["unmasked.png"].is_anomalous and images["unmasked.png"].mask is None
    assert "masks" not in {i.defect for i in images.values()}


def test_validation_defects_are_a_folder_or_type_folders_never_masks_or_good(tmp_path: Path, mvtec: Path) -> None:
    root = write_plain(tmp_path / "plain", n=3)
    with pytest.raises(UserError, match="holds a 'good' folder"):
        defect_images(root)
    shutil.rmtree(root / "good")
    shutil.copytree(root / "scratch", root / "dent")
    typed = defect_images(root)
    assert [(i.defect, i.path.name) for i in typed] == [(t, f"s{k}.png") for t in ("dent", "scratch") for k in range(3)]
    assert typed[3].mask == root / "masks" / "scratch" / "s0.png" and typed[0].mask is None
    flat = defect_images(mvtec / "test" / "scratch")
    assert len(flat) == 16 and {i.defect for i in flat} == {"scratch"}
    (tmp_path / "empty" / "masks").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        defect_images(tmp_path / "empty")


def test_soft_masks_are_binarised_at_half_scale_and_empty_masks_stay_anomalous(tmp_path: Path) -> None:
    soft = np.array([[0, 127], [128, 255]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert load_mask(tmp_path / "soft.png", 16, 10**6).tolist() == (soft >= 128).tolist()
    root = write_plain(tmp_path / "plain", n=4)
    Image.new("L", (96, 96), 0).save(root / "masks" / "scratch" / "s0.png")  # a defect with an empty mask
    model = anomaly.fit(root / "good", method="padim", **SMALL)
    metrics = anomaly.evaluate(model, root)
    assert metrics["defect_images"] == 4 and metrics["defect_images_without_mask"] == 0
    assert metrics["pixel_auroc"] is not None


def test_bad_files_are_skipped_and_reported_never_fatal(tmp_path: Path, mvtec: Path) -> None:
    good = tmp_path / "good"
    shutil.copytree(mvtec / "train" / "good", good)
    readable, bad = write_odd_and_bad_files(good)
    model = anomaly.fit(good, method="patchcore", max_pixels=9_500, **SMALL)  # 96x96 passes, the 100x100 "bomb" not
    skipped = {Path(s["path"]).name: s["reason"] for s in model.fit_info_["skipped"]}
    assert set(skipped) == bad and all(skipped.values())
    assert model.fit_info_["train_images"] + model.fit_info_["holdout_images"] == 40 + len(readable)
    rows = anomaly.predict(model, [good / "corrupt.jpg", good / "000.png"])
    assert rows[0]["decision"] == "skipped" and "corrupt" in rows[0]["reason"]
    assert rows[1]["decision"] in ("good", "anomalous")


def test_cli_fit_predict_evaluate(tmp_path: Path) -> None:
    root = write_plain(tmp_path / "plain")
    model_dir = tmp_path / "model"
    common = ["--workers", "0"]
    result = runner.invoke(anomaly_app, ["fit", str(root / "good"), "--out", str(model_dir), "--backbone",
                                         "test_resnet", "--no-pretrained", "--image-size", "64",
                                         "--layers", "layer1,layer2", "--method", "padim", *common])
    assert result.exit_code == 0, result.output
    assert "fitted padim on 6 images (test_resnet: layer1, layer2, 64 px)" in result.output  # all: k-fold
    assert "from 6 good scores: 5-fold out-of-bank" in result.output
    result = runner.invoke(anomaly_app, ["fit", str(root / "good"), "--out", str(tmp_path / "recall"), "--backbone",
                                         "test_resnet", "--no-pretrained", "--image-size", "64", "--method", "padim",
                                         "--defects", str(root / "scratch"), "--target-recall", "0.5", *common])
    assert result.exit_code == 0, result.output  # --defects: the deprecated name of --val-defects
    rule = json.loads((tmp_path / "recall" / "model.json").read_text())["threshold_rule"]
    assert rule["rule"] == "target-recall" and rule["validation_defect_images"] == 6
    assert rule["validation_recall"] >= 0.5
    result = runner.invoke(anomaly_app, ["predict", str(model_dir), str(root / "scratch"), "--out",
                                         str(tmp_path / "s.csv"), "--heatmaps", str(tmp_path / "heat"), *common])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 7 and len(list((tmp_path / "heat").iterdir())) == 6
    result = runner.invoke(anomaly_app, ["evaluate", str(model_dir), "--data", str(root), *common])
    assert result.exit_code == 0, result.output
    assert (model_dir / "evaluation" / "report.html").is_file() and "image AUROC" in result.output
    (tmp_path / "broken.png").write_bytes(b"not an image")  # nothing readable: exit 2, like predict and explain
    result = runner.invoke(anomaly_app, ["predict", str(model_dir), str(tmp_path / "broken.png"), "--out",
                                         str(tmp_path / "b.csv"), *common])
    assert result.exit_code == 2 and "none of the 1 image file(s) could be read" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "{tmp}/missing", "--out", "{tmp}/m", "--no-pretrained"], "not a folder"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--no-pretrained", "--backbone", "test_resnet"], "no images found"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--method", "svm"], "unknown method 'svm'"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--backbone", "resnet_18"], "unknown model 'resnet_18'"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--backbone", "test_resnet"], "--no-pretrained"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--coreset-ratio", "2"], "--coreset-ratio must be in"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--target-recall", "0.9"], "--target-recall needs --val-defects"),
        (["fit", "{tmp}/empty", "--out", "{tmp}/m", "--target-recall", "0", "--val-defects", "{tmp}/empty"],
         "--target-recall must be in (0, 1]"),
        (["predict", "{tmp}/empty", "{tmp}/empty", "--out", "{tmp}/s.csv"], "not an anomaly model directory"),
        (["predict", "{tmp}/empty", "{tmp}/empty", "--out", "{tmp}/s.csv", "--backend", "tensorrt"],
         "--backend must be one of auto, torch, onnx"),
        (["evaluate", "{tmp}/empty", "--data", "{tmp}/empty"], "needs a 'good' folder"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(anomaly_app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, UserError | AttributeError | TypeError)
