"""`regions`: crops and a CSV split by source image, which the training data layer reads as is."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from visiontune.data.sources import discover
from visiontune.detect import regions as regions_module
from visiontune.detect.labelling import BACKGROUND
from visiontune.detect.regions import (
    PROPOSALS_DIR,
    REGIONS_CSV,
    REGIONS_SUMMARY,
    regions,
    write_regions,
)
from visiontune.detect.synthetic import make_tiles
from visiontune.detect.types import ImageTargets
from visiontune.errors import UserError

REGION_OPTIONS = dict(proposals="sliding", max_proposals=60, max_negatives=6, size=32, context=4, progress=False)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    annotations = make_tiles(root / "tiles", 6, size=96, seed=0)
    summary = regions(root / "tiles" / "images", annotations, root / "out", val_fraction=0.2, test_fraction=0.2,
                      seed=0, **REGION_OPTIONS)
    return root / "out", summary


def rows(out: Path) -> list[dict]:
    with (out / REGIONS_CSV).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_crops_and_rows_split_by_source_image(written):
    out, summary = written
    listed = rows(out)
    assert list(listed[0]) == ["path", "label", "iou", "image", "box", "split"]
    splits_of_image: dict[str, set[str]] = {}
    for row in listed:
        splits_of_image.setdefault(row["image"], set()).add(row["split"])
        assert (out / row["path"]).is_file() and row["path"].startswith(f"crops/{row['label']}/")
        assert row["label"] in ("crack", "blob", BACKGROUND) and len(row["box"].split()) == 4
    assert all(len(s) == 1 for s in splits_of_image.values())  # no image in two splits
    assert {s.pop() for s in splits_of_image.values()} == {"train", "val", "test"}
    assert summary["images"] == 6 and summary["regions"] == len(listed) and summary["skipped"] == []
    assert json.loads((out / REGIONS_SUMMARY).read_text())["regions"] == len(listed)
    per_image = {}
    for row in listed:
        if row["label"] == BACKGROUND:
            per_image[row["image"]] = per_image.get(row["image"], 0) + 1
    assert max(per_image.values()) <= 6  # negatives capped per image
    true_boxes = [row for row in listed if row["iou"] == "1.0000"]
    assert len(true_boxes) >= sum(1 for row in listed if row["label"] != BACKGROUND) // 2


def test_the_training_data_layer_reads_the_csv_with_its_classes_and_splits(written):
    out, _ = written
    found = discover(out / REGIONS_CSV)
    listed = rows(out)
    assert found.labels == sorted({row["label"] for row in listed}) and BACKGROUND in found.labels
    by_path = {str((out / row["path"]).resolve()): row["split"] for row in listed}
    assert {s.path: s.split for s in found.samples} == by_path


def test_a_second_run_reuses_the_cached_proposals(written, tmp_path):
    out, _ = written
    images = sorted((out.parent / "tiles" / "images").glob("*.png"))
    targets = [ImageTargets(path, 96, 96, np.zeros((0, 4)), []) for path in images]
    shutil.copytree(out / PROPOSALS_DIR, tmp_path / PROPOSALS_DIR)
    summary = write_regions({"train": targets}, ["crack", "blob"], tmp_path, **REGION_OPTIONS)
    assert summary["proposal_cache"] == {"hits": 6, "misses": 0}


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = make_tiles(tmp_path / "tiles", 1, size=64, seed=1).parent / "images" / "tile_00000.png"
    summary = write_regions({"train": [ImageTargets(good, 64, 64, [[5, 5, 30, 30]], [0]),
                                       ImageTargets(bad, 64, 64, np.zeros((0, 4)), [])]},
                            ["crack", "blob"], tmp_path / "out", **REGION_OPTIONS)
    assert [row["path"] for row in summary["skipped"]] == [str(bad)] and summary["images"] == 1
    with pytest.raises(UserError, match="none of the images could be read"):
        write_regions({"train": [ImageTargets(bad, 64, 64, np.zeros((0, 4)), [])]}, ["crack"], tmp_path / "o2",
                      **REGION_OPTIONS)


def test_a_class_named_background_is_refused(tmp_path):
    with pytest.raises(UserError, match="'background' is the name of the negative regions"):
        write_regions({"train": []}, ["crack", BACKGROUND], tmp_path, **REGION_OPTIONS)


@pytest.mark.parametrize(("option", "message"), [
    ({"iou_neg": 0.6}, "need 0 <= --iou-neg <= --iou-pos <= 1"),
    ({"search_side": 16}, "--search-side must be at least 32 pixels"),
    ({"size": 8}, "--size 8 with --context 4"),
])
def test_an_option_that_cannot_work_is_one_message_before_any_image_is_read(tmp_path, option, message):
    missing = ImageTargets(tmp_path / "absent.png", 64, 64, np.zeros((0, 4)), [])
    with pytest.raises(UserError, match=message):
        write_regions({"train": [missing]}, ["crack"], tmp_path / "out", **(REGION_OPTIONS | option))
    assert not (tmp_path / "out").exists()


def test_the_summary_says_how_many_true_boxes_the_proposals_reach(tmp_path, monkeypatch):
    class FixedProposals:  # one proposal on the crack, none near the blob
        def __init__(self, *args) -> None:
            self.hits = self.misses = 0

        def proposals(self, path, image):
            return np.array([[5, 5, 30, 30], [40, 0, 60, 10]], np.float32)

    monkeypatch.setattr(regions_module, "ProposalCache", FixedProposals)
    image = make_tiles(tmp_path / "tiles", 1, size=64, seed=1).parent / "images" / "tile_00000.png"
    targets = ImageTargets(image, 64, 64, np.array([[5, 5, 30, 30], [35, 35, 60, 60]], np.float32), [0, 1])
    summary = write_regions({"train": [targets]}, ["crack", "blob"], tmp_path / "out", **REGION_OPTIONS)
    assert summary["proposal_recall"] == {"crack": 1.0, "blob": 0.0} and summary["mean_proposals"] == 2
