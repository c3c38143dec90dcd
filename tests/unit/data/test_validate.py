"""`check_data`: unreadable files, duplicates, leakage, small images, imbalance, split problems."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import colour_image, write_class_folders
from visiontune.data.validate import check_data

BOMB_LIMIT = 10_000  # max_pixels used with the 300x300 "bomb" (90,000 px); others are <= 2,500 px


def noisy(size=(48, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_bad_files(folder: Path) -> dict[str, str]:
    """Unusable files in `folder`: name -> fragment of the reason they must be skipped with."""
    rng = np.random.default_rng(5)
    (folder / "corrupt.jpg").write_bytes(bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    (folder / "empty.png").touch()
    noisy().save(folder / "whole.tmp.jpg", format="JPEG", quality=95)
    whole = (folder / "whole.tmp.jpg").read_bytes()
    (folder / "whole.tmp.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "text.png").write_text("<html>not an image</html>\n" * 10)
    noisy((300, 300)).save(folder / "bomb.png")
    return {
        "corrupt.jpg": "not a readable image",
        "empty.png": "empty file",
        "truncated.jpg": "truncated",
        "text.png": "not a readable image",
        "bomb.png": "decompression bomb",
    }


def write_odd_readable_files(folder: Path) -> list[str]:
    """Files in unusual modes that decode fine and must not be skipped."""
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 1600).astype(np.uint16).reshape(40, 40)).save(folder / "deep.png")
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:20] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "exif.jpg", exif=exif)
    return ["cmyk.jpg", "deep.png", "palette.png", "rgba.png", "exif.jpg"]


def total(report, label: str) -> int:
    return sum(report.counts[label].values())


def names(paths) -> set[str]:
    return {Path(p.split(":", 1)[-1]).name for p in paths}


def has(messages: list[str], fragment: str) -> bool:
    return any(fragment in m for m in messages)


def test_clean_data_has_no_errors_or_warnings(binary_folder):
    report = check_data(str(binary_folder))
    assert report.source == "folders"
    assert report.labels == ["blue", "red"]
    assert report.counts == {c: {"train": 10, "val": 1, "test": 1} for c in ("blue", "red")}
    assert report.errors == [] and report.warnings == []
    assert report.skipped == [] and report.duplicate_groups == [] and report.small_images == []
    assert report.imbalance_ratio == 1.0
    assert json.loads(json.dumps(report.to_dict()))["counts"]["red"]["train"] == 10


def test_every_bad_file_is_skipped_with_a_reason(binary_folder):
    expected = write_bad_files(binary_folder / "blue")
    odd = write_odd_readable_files(binary_folder / "red")
    report = check_data(str(binary_folder), max_pixels=BOMB_LIMIT)
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert not set(odd) & set(reasons)
    assert total(report, "blue") == 12 and total(report, "red") == 12 + len(odd)
    assert has(report.warnings, "5 unreadable file(s) will be skipped")
    assert report.errors == []


def test_class_with_only_unreadable_files(binary_folder):
    (binary_folder / "grey").mkdir()
    bad = write_bad_files(binary_folder / "grey")
    report = check_data(str(binary_folder), max_pixels=BOMB_LIMIT)
    assert len(report.skipped) == len(bad)
    assert report.labels == ["blue", "red"] and total(report, "grey") == 0
    assert has(report.errors, "class 'grey' has no readable images")


def test_duplicates_within_a_split(split_folders):
    original = split_folders / "train" / "blue" / "blue_000.png"
    shutil.copy(original, split_folders / "train" / "blue" / "copy.png")
    report = check_data(str(split_folders))
    assert [names(g) for g in report.duplicate_groups] == [{"blue_000.png", "copy.png"}]
    assert report.cross_split_duplicates == []
    assert has(report.warnings, "1 group(s) of identical images within a split")
    assert report.errors == []


def test_duplicate_across_train_and_val_is_leakage(split_folders):
    original = split_folders / "train" / "red" / "red_003.png"
    copy = split_folders / "val" / "red" / "leaked.png"
    shutil.copy(original, copy)
    report = check_data(str(split_folders))
    assert report.source == "split_folders"
    assert len(report.cross_split_duplicates) == 1
    assert sorted(report.cross_split_duplicates[0]) == [
        f"train:{original.resolve()}",
        f"val:{copy.resolve()}",
    ]
    assert has(report.errors, "1 identical image(s) appear in more than one split")
    assert not has(report.warnings, "within a split")


def test_small_images_are_listed(split_folders):
    folder = split_folders / "train" / "red"
    for seed, (name, size) in enumerate([("tiny.png", (20, 20)), ("strip.png", (100, 20)), ("edge.png", (32, 32))]):
        colour_image((210, 40, 40), 500 + seed, size).save(folder / name)
    report = check_data(str(split_folders), min_side=32)
    small = {Path(s["path"]).name: (s["width"], s["height"]) for s in report.small_images}
    assert small == {"tiny.png": (20, 20), "strip.png": (100, 20)}  # 32x32 is not smaller than 32
    assert has(report.warnings, "2 image(s) smaller than 32px on a side")
    assert check_data(str(split_folders), min_side=16).small_images == []


@pytest.mark.parametrize("red, ratio, warned", [(4, 3.0, True), (5, 2.4, False)])
def test_imbalance_ratio(tmp_path, red, ratio, warned):
    root = write_class_folders(tmp_path / "d", {"blue": 12, "red": red})
    report = check_data(str(root))
    assert report.imbalance_ratio == pytest.approx(ratio)
    assert has(report.warnings, f"class imbalance {ratio:.1f}:1") is warned


def test_empty_class_folder_is_an_error(binary_folder):
    (binary_folder / "green").mkdir()
    report = check_data(str(binary_folder))
    assert report.errors == ["class folder 'green' has no images"]
    assert report.labels == ["blue", "red"]


def test_class_missing_from_val_is_an_error(split_folders):
    shutil.rmtree(split_folders / "val" / "red")
    report = check_data(str(split_folders))
    assert report.errors == ["class 'red' has no images in val"]


def test_class_too_small_to_split_is_reported_not_raised(tmp_path):
    root = write_class_folders(tmp_path / "d", {"blue": 10, "red": 2})
    report = check_data(str(root))
    assert report.errors[0].startswith("too few images to split class(es) 'red' (2)")
    assert len(report.errors) == 1
    assert report.counts == {"blue": {"unsplit": 10}, "red": {"unsplit": 2}}
    assert report.imbalance_ratio == 5.0


def test_only_one_class_is_an_error(tmp_path):
    root = write_class_folders(tmp_path / "d", {"blue": 10})
    report = check_data(str(root))
    assert has(report.errors, "at least 2 classes with readable images are needed, found 1")


def test_source_notes_become_warnings(split_folders):
    shutil.rmtree(split_folders / "val")
    report = check_data(str(split_folders))
    assert report.errors == []
    assert report.warnings == ["no val/ folder: validation images are split off train/"]
    assert report.counts["blue"] == {"train": 7, "val": 1, "test": 3}
