"""The demo scenes' grammar and relation checker, and reading captions files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.caption.data import read_captions
from visiontune.caption.scenes import Shape, captions_for, make_scenes, relation, relation_correct
from visiontune.errors import UserError

RED = Shape("circle", "red", "small", 0.2, 0.5)
BLUE = Shape("square", "blue", "large", 0.8, 0.45)


def test_relation_follows_the_wider_axis() -> None:
    assert relation(RED, BLUE) == "left of" and relation(BLUE, RED) == "right of"
    top, bottom = Shape("circle", "red", "small", 0.5, 0.1), Shape("circle", "blue", "small", 0.55, 0.9)
    assert relation(top, bottom) == "above" and relation(bottom, top) == "below"


def test_every_two_shape_caption_is_true_and_a_wrong_one_is_caught() -> None:
    for caption in captions_for([RED, BLUE], np.random.default_rng(0)):
        assert relation_correct(caption, [RED, BLUE]), caption
    assert not relation_correct("a small red circle right of a large blue square", [RED, BLUE])
    assert relation_correct("a small red circle right of a large blue square", [RED, BLUE], axis_only=True)
    assert not relation_correct("a small red circle above a large blue square", [RED, BLUE], axis_only=True)
    assert not relation_correct("a small green circle left of a large blue square", [RED, BLUE])  # no such shape
    assert not relation_correct("a small red circle", [RED, BLUE])  # no relation at all


def test_make_scenes_writes_images_captions_and_scenes(tmp_path: Path) -> None:
    path = make_scenes(tmp_path, {"train": 6, "val": 2, "test": 2}, image_size=48, seed=1)
    captions = read_captions(path)
    assert len(captions.images) == 10 and all(len(c) == 3 for c in captions.captions)
    assert captions.splits.count("train") == 6 and captions.splits.count("test") == 2
    scenes = json.loads((tmp_path / "scenes.json").read_text())
    assert set(scenes) == {f"images/{Path(p).name}" for p in captions.images}
    assert Image.open(captions.images[0]).size == (48, 48)


def _csv(folder: Path, text: str, images: int = 6) -> Path:
    folder.mkdir(exist_ok=True)
    for i in range(images):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    path = folder / "captions.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_rows_are_dropped_with_reasons_and_images_split_whole(tmp_path: Path) -> None:
    rows = "".join(f"{i}.png,caption {i} a\n{i}.png,caption {i} b\n" for i in range(6))
    path = _csv(tmp_path, "image,caption\n" + rows + "missing.png,a cat\n3.png,   \n")
    captions = read_captions(path, val_fraction=0.2, test_fraction=0.2)
    assert sorted(d["reason"] for d in captions.dropped) == ["empty caption", "image file not found"]
    assert all(len(c) == 2 for c in captions.captions)  # both captions of an image, in its one split
    assert {"train", "val", "test"} == set(captions.splits)


def test_files_users_get_wrong_are_one_message(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not UTF-8"):
        read_captions(_bytes(tmp_path, b"image,caption\n0.png,caf\xe9\n"))
    with pytest.raises(UserError, match="'image' and 'caption'"):
        read_captions(_csv(tmp_path, "file,text\n0.png,a\n"))
    with pytest.raises(UserError, match="more than one split"):
        read_captions(_csv(tmp_path, "image,caption,split\n0.png,a,train\n0.png,b,test\n1.png,c,val\n"))
    with pytest.raises(UserError, match="at least 3"):
        read_captions(_csv(tmp_path, "image,caption\n0.png,a single caption\n"))
    with pytest.raises(UserError, match="not found"):
        read_captions(tmp_path / "nothing.csv")


def _bytes(folder: Path, data: bytes) -> Path:
    path = folder / "latin1.csv"
    path.write_bytes(data)
    return path


def test_coco_captions_json(tmp_path: Path) -> None:
    _csv(tmp_path, "image,caption\n")
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(6)],
            "annotations": [{"image_id": i, "caption": f"thing {i}"} for i in range(6)]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    captions = read_captions(tmp_path / "c.json")
    assert sorted(c[0] for c in captions.captions) == [f"thing {i}" for i in range(6)]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not a COCO captions file"):
        read_captions(tmp_path / "bad.json")
