"""Annotation parsing: every format reads back the same boxes, bad annotations are listed (not
fatal), wrong paths are one message, and the split is by image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.detect.annotations import load_annotations, split_detection_set
from visiontune.detect.synthetic import make_tiles
from visiontune.errors import UserError


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiles")
    make_tiles(root, 6, size=64, seed=3, formats=("voc", "yolo", "masks"))
    return root


def _boxes(dataset) -> dict[tuple[str, str], list]:
    found: dict[tuple[str, str], list] = {}
    for t in dataset.images:
        for box, label in zip(t.boxes, t.labels):
            found.setdefault((t.path.name, dataset.classes[label]), []).append(box.tolist())
    return {key: sorted(value) for key, value in found.items()}


def test_every_format_parses_to_the_same_boxes(tiles: Path) -> None:
    coco = load_annotations(tiles / "annotations.json", tiles / "images")
    assert coco.classes == ["crack", "blob"] and len(coco.images) == 6 and not coco.problems
    expected = _boxes(coco)
    assert sum(len(v) for v in expected.values()) >= 4
    for fmt, source in (("voc", "voc"), ("yolo", "yolo"), ("masks", "masks")):
        dataset = load_annotations(tiles / source, tiles / "images")  # auto-detected
        assert sorted(dataset.classes) == ["blob", "crack"] and not dataset.problems, fmt
        got = _boxes(dataset)
        assert got.keys() == expected.keys(), fmt
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], atol=0.01, err_msg=f"{fmt} {key}")
    assert {t.path.name for t in coco.images} == {t.path.name for t in dataset.images}  # background images kept


def test_bad_coco_annotations_are_listed_not_fatal(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"}],
            "categories": [{"id": 1, "name": "crack"}],
            "annotations": [
                {"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},  # fine
                {"image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20]},  # partly outside: clipped
                {"image_id": 1, "category_id": 1, "bbox": [50, 40, 5, 5]},  # wholly outside
                {"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 4]},  # no area
                {"image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2]},  # unknown class
                {"image_id": 1, "category_id": 1, "bbox": "oops"},  # malformed
                {"image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]},  # its image is missing
            ]}
    (tmp_path / "coco.json").write_text(json.dumps(data))
    dataset = load_annotations(tmp_path / "coco.json", tmp_path)
    assert [t.path.name for t in dataset.images] == ["a.png"]
    np.testing.assert_allclose(dataset.images[0].boxes, [[5, 5, 15, 15], [30, 20, 40, 30]])
    reasons = " | ".join(p.reason for p in dataset.problems)
    for expected in ("clipped", "box outside the 40x30 image", "zero or negative area", "unknown class",
                     "not an image_id", "missing image"):
        assert expected in reasons
    assert len(dataset.problems) == 6


def test_bad_yolo_lines_and_hostile_xml_are_listed(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (50, 50)).save(images / f"{name}.png")
    yolo = tmp_path / "yolo"
    yolo.mkdir()
    (yolo / "data.yaml").write_text("names: {0: crack, 1: blob}\n")
    (yolo / "a.txt").write_text("0 0.5 0.5 0.2 0.2\nthis is garbage\n5 0.5 0.5 0.1 0.1\n1 0.5 0.5 0 0.1\n")
    (yolo / "zzz.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # no such image
    dataset = load_annotations(yolo, images)
    assert dataset.classes == ["crack", "blob"] and len(dataset.images) == 3
    a = next(t for t in dataset.images if t.path.name == "a.png")
    np.testing.assert_allclose(a.boxes, [[20, 20, 30, 30]])
    reasons = [p.reason for p in dataset.problems]
    assert any("not 'class cx cy w h'" in r for r in reasons) and any("unknown class: 5" in r for r in reasons)
    assert any("zero or negative" in r for r in reasons) and any("missing image" in r for r in reasons)

    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "a.xml").write_text("<annotation><filename>a.png</filename><object><name>crack</name><bndbox>"
                               "<xmin>11</xmin><ymin>11</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>"
                               "<object><name>crack</name></object></annotation>")
    (voc / "b.xml").write_text('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                               '<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><annotation>&lol2;</annotation>')
    (voc / "c.xml").write_text("<annotation><filename>c.png</filename><object>")  # truncated
    dataset = load_annotations(voc, images)
    a = next(t for t in dataset.images if t.path.name == "a.png")
    np.testing.assert_allclose(a.boxes, [[10, 10, 20, 30]])  # VOC's 1-based inclusive pixels
    by_file = {p.source.split(":")[0]: p.reason for p in dataset.problems}
    assert set(by_file) == {"a.xml", "b.xml", "c.xml"}
    assert "EntitiesForbidden" in by_file["b.xml"] and "ParseError" in by_file["c.xml"]


def test_a_wrong_path_or_nothing_usable_is_one_user_error(tmp_path: Path, tiles: Path) -> None:
    with pytest.raises(UserError, match="no such annotation file"):
        load_annotations(tmp_path / "missing.json", tiles / "images")
    with pytest.raises(UserError, match="no such image folder"):
        load_annotations(tiles / "annotations.json", tmp_path / "nowhere")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_annotations(tmp_path / "broken.json", tiles / "images")
    (tmp_path / "empty.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(UserError, match="nothing usable"):
        load_annotations(tmp_path / "empty.json", tiles / "images")


def test_sizes_follow_the_exif_rotation(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: decoded as 20 x 40
    image.save(tmp_path / "r.jpg", exif=exif)
    data = {"images": [{"id": 1, "file_name": "r.jpg"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [2, 25, 10, 10]}]}
    (tmp_path / "coco.json").write_text(json.dumps(data))
    target = load_annotations(tmp_path / "coco.json", tmp_path).images[0]
    assert (target.width, target.height) == (20, 40)
    np.testing.assert_allclose(target.boxes, [[2, 25, 12, 35]])


def test_split_is_by_image_seeded_and_honours_split_folders(tmp_path: Path, tiles: Path) -> None:
    dataset = load_annotations(tiles / "annotations.json", tiles / "images")
    splits = split_detection_set(dataset, seed=1)
    names = {k: sorted(t.path.name for t in v) for k, v in splits.items()}
    assert sum(len(v) for v in names.values()) == 6 and all(names.values())
    assert len(set(sum(names.values(), []))) == 6
    assert names == {k: sorted(t.path.name for t in v) for k, v in split_detection_set(dataset, seed=1).items()}

    images = tmp_path / "images"
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    for i, split in enumerate(["train"] * 4 + ["val", "test"]):
        (images / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20)).save(images / split / f"{i}.png")
        data["images"].append({"id": i, "file_name": f"{split}/{i}.png"})
        data["annotations"].append({"image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]})
    (tmp_path / "coco.json").write_text(json.dumps(data))
    splits = split_detection_set(load_annotations(tmp_path / "coco.json", images))
    assert {k: [t.path.parent.name for t in v] for k, v in splits.items()} == {
        "train": ["train"] * 4, "val": ["val"], "test": ["test"]}
