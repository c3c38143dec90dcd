"""`visiontune detect` end to end on tiny generated tiles: a Faster R-CNN run directory that loads
back, predict rows, evaluate files, ResNet-50 weights in either naming, and the CLI's messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision

from tests.integration.test_cli import cli
from visiontune import detect
from visiontune.detect import faster_rcnn
from visiontune.detect.faster_rcnn import FasterRCNNOptions
from visiontune.errors import UserError, WeightsUnavailableError
from visiontune.runformat import WrongArtifactError

TINY = dict(model="test_resnet", pretrained=False, epochs=1, min_size=64, max_size=64, batch_size=4)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return detect.make_tiles(tmp_path_factory.mktemp("tiles"), 8, size=64, seed=1)


@pytest.fixture(scope="module")
def run(tiles: Path, tmp_path_factory):
    return detect.fit(tiles, tiles.parent / "images", tmp_path_factory.mktemp("runs") / "frcnn",
                      faster_rcnn=FasterRCNNOptions(**TINY))


def test_fit_writes_a_run_that_loads_back(run) -> None:
    meta = json.loads((run.dir / "model.json").read_text())
    assert meta["kind"] == "detector" and meta["method"] == "faster-rcnn" and meta["classes"] == ["crack", "blob"]
    assert meta["faster_rcnn"]["model"] == "test_resnet" and 0 <= meta["threshold"] <= 1
    assert safetensors.torch.load_file(str(run.dir / "checkpoints" / "best.safetensors"))
    summary = json.loads((run.dir / "summary.json").read_text())
    assert sum(summary["images"].values()) == 8 and summary["annotation_problems"] == []
    assert {"map_50", "map", "recall_at_threshold"} <= set(summary["test"])
    rows = list(csv.DictReader((run.dir / "splits.csv").open()))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["image"], r["split"]) == r["split"]
    assert (run.dir / "eval" / "test" / "report.html").is_file()


def test_predict_and_evaluate_a_loaded_run(run, tiles: Path, tmp_path: Path) -> None:
    loaded = detect.load(run.dir)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows, skipped = loaded.predict([tiles.parent / "images" / "tile_00000.png", tmp_path / "broken.png"],
                                   score_threshold=0.0)
    assert skipped[0][0].endswith("broken.png") and rows
    assert set(rows[0]) == {"image", "label", "score", "x1", "y1", "x2", "y2"} and rows[0]["label"] in loaded.classes
    assert all(0 <= r["x1"] <= r["x2"] <= 64 for r in rows)
    result = loaded.evaluate("val")
    assert "optimistic" in result["note"] and result["images_per_second"] > 0
    written = json.loads((run.dir / "eval" / "val" / "metrics.json").read_text())
    assert written["metrics"]["map_50"]["value"] == result["metrics"]["map_50"]["value"]
    on_annotations = loaded.evaluate(annotations=tiles, images=tiles.parent / "images", report=False)
    assert on_annotations["images"] == 8


def test_resnet50_weights_load_in_torchvision_or_prefixed_names(tmp_path: Path) -> None:
    state = torchvision.models.resnet50().state_dict()
    safetensors.torch.save_file({f"backbone.body.{k}": v for k, v in state.items()}, str(tmp_path / "r50.safetensors"))
    options = FasterRCNNOptions(arch="fasterrcnn_resnet50_fpn_v2", weights=str(tmp_path / "r50.safetensors"))
    model = faster_rcnn.build_model(options, num_classes=2)
    assert torch.equal(model.backbone.body.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    with pytest.raises(WeightsUnavailableError, match="not downloaded"):
        faster_rcnn.check_options(FasterRCNNOptions(arch="fasterrcnn_resnet50_fpn_v2"))
    safetensors.torch.save_file({"conv1.weight": state["conv1.weight"]}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="do not fit a ResNet-50"):
        faster_rcnn.build_model(FasterRCNNOptions(arch="fasterrcnn_resnet50_fpn_v2",
                                                  weights=str(tmp_path / "partial.safetensors")), 2)


def test_wrong_runs_and_paths_are_one_message(run, tmp_path: Path) -> None:
    other = tmp_path / "caption_run"
    other.mkdir()
    (other / "model.json").write_text(json.dumps({"kind": "caption", "format_version": 1}))
    with pytest.raises(WrongArtifactError, match="caption"):
        detect.load(other)
    with pytest.raises(UserError, match="already exists"):
        detect.fit(tmp_path / "a.json", tmp_path, run.dir, faster_rcnn=FasterRCNNOptions(**TINY))
    with pytest.raises(UserError, match="no such annotation"):
        detect.fit(tmp_path / "a.json", tmp_path, tmp_path / "new", faster_rcnn=FasterRCNNOptions(**TINY))


@pytest.mark.slow
def test_cli_fit_predict_evaluate_and_errors(tiles: Path, tmp_path: Path) -> None:
    images = tiles.parent / "images"
    out = tmp_path / "run"
    flags = ["--model", "test_resnet", "--no-pretrained", "--epochs", "1", "--min-size", "64", "--max-size", "64"]
    result = cli("detect", "fit", images, "--boxes", tiles, "--out", out, *flags)
    assert result.returncode == 0, result.stderr
    assert "threshold" in result.stdout and "mAP@0.5" in result.stdout
    result = cli("detect", "predict", out, images, "--out", tmp_path / "preds.csv", "--score-threshold", "0")
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "preds.csv").read_text().splitlines()[0]
    assert header == "image,label,score,x1,y1,x2,y2"
    other = tmp_path / "caption_run"
    other.mkdir()
    (other / "model.json").write_text(json.dumps({"kind": "caption", "format_version": 1}))
    for args, expected in ((("detect", "fit", images, "--boxes", tmp_path / "missing.json", *flags), "no such"),
                           (("detect", "evaluate", other), "is a caption model, not a detector run")):
        result = cli(*args)
        assert result.returncode == 2 and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_anchor_ratios_shape_the_rpn_anchors() -> None:
    wide = faster_rcnn.build_model(FasterRCNNOptions(**TINY, anchor_ratios=(0.25, 1.0, 4.0)), num_classes=2)
    generator = wide.rpn.anchor_generator
    assert generator.num_anchors_per_location() == [3] * 4  # timm-fpn: three levels and a pooled one
    cells = generator.cell_anchors or generator.generate_anchors(generator.sizes, generator.aspect_ratios)
    sides = cells[0][:, 2:] - cells[0][:, :2]  # [ratio, (w, h)] of the smallest level
    assert torch.allclose(sides[:, 1] / sides[:, 0], torch.tensor([0.25, 1.0, 4.0]), rtol=0.1)
    default = faster_rcnn.build_model(FasterRCNNOptions(**TINY), num_classes=2).rpn.anchor_generator
    assert default.aspect_ratios[0] == (0.5, 1.0, 2.0)  # runs fitted before the option load as they were
    for given, expected in (("0.25,x", "not a comma-separated list of numbers"), ("0,1", "--anchor-ratios: Input "
                                                                                          "should be greater than 0")):
        result = cli("detect", "fit", "imgs", "--boxes", "a.json", "--anchor-ratios", given)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_classifier_runs_backbone_initialises_timm_fpn(tmp_path: Path) -> None:
    classifier = timm.create_model("test_resnet", num_classes=3)
    run_dir = tmp_path / "classifier"
    (run_dir / "checkpoints").mkdir(parents=True)
    safetensors.torch.save_model(classifier, str(run_dir / "checkpoints" / "best.safetensors"))
    (run_dir / "model.json").write_text(json.dumps({"kind": "classifier", "model": "test_resnet",
                                                    "labels": ["a", "b", "c"], "preprocessing": {}}))
    model = faster_rcnn.build_model(FasterRCNNOptions(model="test_resnet", weights=str(run_dir)), num_classes=2)
    assert torch.equal(model.backbone.body.layer4[0].conv1.weight, classifier.layer4[0].conv1.weight)
    with pytest.raises(UserError, match="is a run of test_resnet, not resnet18"):
        faster_rcnn.check_options(FasterRCNNOptions(model="resnet18", weights=str(run_dir)))


def test_a_detector_run_is_served_with_the_boxes_predict_writes(run, tiles: Path) -> None:
    from fastapi.testclient import TestClient

    from visiontune.serve.app import ServeSettings, create_app
    from visiontune.serve.models import load_served

    image = tiles.parent / "images" / "tile_00002.png"
    expected, _ = detect.load(run.dir).predict([image])
    served = load_served(run.dir, name="det")
    with TestClient(create_app([served], ServeSettings(warm_up=True))) as client:
        answer = client.post("/models/det/predict?overlay=true", files={"file": ("t.png", image.read_bytes(), "image/png")})
        card = client.get("/models/det").json()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    result = body["results"][0]
    assert body["kind"] == "detector" and result["count"] == len(expected) > 0 and result["overlay_png"]
    assert [(b["label"], b["score"], b["box"]) for b in result["boxes"]] == [
        (r["label"], r["score"], [r["x1"], r["y1"], r["x2"], r["y2"]]) for r in expected]
    assert card["method"] == "faster-rcnn" and card["classes"] == ["crack", "blob"]
