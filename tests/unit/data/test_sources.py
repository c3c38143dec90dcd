"""`discover` on the four layouts, seeded stratified splits, and what it refuses."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import colour_image, write_class_folders
from visiontune.data.sources import discover
from visiontune.data.splits import TooFewImagesError, split_sizes, write_splits_csv
from visiontune.errors import UserError


def counts(sample_set) -> Counter:
    """(label, split) -> number of samples."""
    return Counter((s.label, s.split) for s in sample_set.samples)


def triples(sample_set) -> set[tuple[str, str, str]]:
    return {(s.path, s.label, s.split) for s in sample_set.samples}


def paths_in(split: str, sample_set) -> set[str]:
    return {s.path for s in sample_set.samples if s.split == split}


def files_under(folder: Path) -> set[str]:
    return {str(p.resolve()) for p in folder.rglob("*.png")}


def write_csv(path: Path, rows: list[list[str]], header=("path", "label", "split")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_named(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        colour_image((100, 100, 100), i, (8, 8)).save(folder / name)


# --- class folders, stratified split ------------------------------------------------------------


def test_class_folders_labels_and_default_split(three_class_folder):
    found = discover(three_class_folder)
    assert found.source == "folders"
    assert found.root == str(three_class_folder.resolve())
    assert found.labels == ["blue", "green", "red"]
    assert {s.path for s in found.samples} == files_under(three_class_folder)
    expected = {(c, split): n for c in found.labels for split, n in (("train", 8), ("val", 1), ("test", 1))}
    assert counts(found) == expected
    assert found.empty_classes == [] and found.notes == []


def test_stratified_80_10_10_on_20_per_class(tmp_path):
    root = write_class_folders(tmp_path / "d", {"blue": 20, "red": 20})
    assert split_sizes(20, 0.1, 0.1) == (2, 2)
    found = discover(root)
    for label in ("blue", "red"):
        assert [counts(found)[(label, s)] for s in ("train", "val", "test")] == [16, 2, 2]


def test_split_is_seeded(tmp_path):
    root = write_class_folders(tmp_path / "d", {"blue": 20, "red": 20})
    first, again, other = discover(root, seed=3), discover(root, seed=3), discover(root, seed=4)
    assert triples(first) == triples(again)
    assert paths_in("val", first) != paths_in("val", other)
    assert counts(first) == counts(other)  # only which images, not how many


def test_split_false_keeps_samples_unsplit(binary_folder):
    found = discover(binary_folder, split=False)
    assert {s.split for s in found.samples} == {""} and len(found.samples) == 24


def test_too_few_images_names_the_class(tmp_path):
    root = write_class_folders(tmp_path / "d", {"blue": 10, "red": 2})
    with pytest.raises(TooFewImagesError, match=r"'red' \(2\)") as caught:
        discover(root)
    assert "'blue'" not in str(caught.value)
    assert "at least 3" in str(caught.value)
    assert isinstance(caught.value, UserError)


# --- split folders ------------------------------------------------------------------------------


def test_split_folders_keep_their_splits(split_folders):
    found = discover(split_folders)
    assert found.source == "split_folders"
    assert found.labels == ["blue", "red"]
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        assert paths_in(split, found) == files_under(split_folders / split)
        assert counts(found)[("blue", split)] == counts(found)[("red", split)] == n


@pytest.mark.parametrize("name", ["valid", "Validation"])
def test_other_val_folder_names(split_folders, name):
    (split_folders / "val").rename(split_folders / name)
    found = discover(split_folders)
    assert paths_in("val", found) == files_under(split_folders / name)
    assert len(paths_in("val", found)) == 6


def test_train_and_test_without_val_carves_val_from_train(split_folders):
    shutil.rmtree(split_folders / "val")
    found = discover(split_folders, seed=5)
    train_files = files_under(split_folders / "train")
    assert paths_in("val", found) <= train_files
    assert paths_in("train", found) | paths_in("val", found) == train_files
    assert paths_in("test", found) == files_under(split_folders / "test")  # untouched
    assert counts(found)[("blue", "val")] == counts(found)[("red", "val")] == 1  # round(8 * 0.1)
    assert any("no val/ folder" in note for note in found.notes)


def test_empty_class_folder_is_listed(tmp_path):
    root = write_class_folders(tmp_path / "d", {"blue": 10, "red": 10})
    (root / "green").mkdir()
    found = discover(root)
    assert found.empty_classes == ["green"]
    assert found.labels == ["blue", "red"]


def test_empty_class_folder_in_split_folders_names_the_split(split_folders):
    (split_folders / "val" / "green").mkdir()
    assert discover(split_folders).empty_classes == ["val/green"]


def test_hidden_and_non_image_files_are_ignored(binary_folder):
    expected = triples(discover(binary_folder, seed=1))
    image = colour_image((0, 0, 0), 99)
    (binary_folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    image.save(binary_folder / "blue" / "._blue_000.png")
    (binary_folder / "blue" / ".hidden").mkdir()
    image.save(binary_folder / "blue" / ".hidden" / "inner.png")
    (binary_folder / ".cache").mkdir()
    image.save(binary_folder / ".cache" / "thumb.png")  # hidden folder is not a class
    (binary_folder / "red" / "notes.txt").write_text("not an image")
    (binary_folder / "red" / "labels.csv").write_text("path,label\n")
    found = discover(binary_folder, seed=1)
    assert triples(found) == expected
    assert found.labels == ["blue", "red"] and len(found.samples) == 24


# --- CSV ----------------------------------------------------------------------------------------


@pytest.fixture
def csv_images(tmp_path) -> Path:
    return write_class_folders(tmp_path / "images", {"blue": 10, "red": 10})


def test_csv_relative_paths_resolve_against_csv_folder(csv_images, tmp_path, monkeypatch):
    rows = [[f"../images/{p.parent.name}/{p.name}", p.parent.name] for p in sorted(csv_images.rglob("*.png"))]
    csv_path = write_csv(tmp_path / "meta" / "labels.csv", rows, header=("path", "label"))
    monkeypatch.chdir(csv_images / "blue")  # the working directory must not matter
    found = discover(csv_path)
    assert found.source == "csv" and found.root == str(csv_path.resolve())
    assert {s.path for s in found.samples} == files_under(csv_images)
    assert all(Path(s.path).parent.name == s.label for s in found.samples)
    assert counts(found)[("blue", "train")] == 8 and counts(found)[("red", "test")] == 1


def test_csv_split_column_is_normalised(csv_images, tmp_path):
    spellings = ["train", "TRAIN", "valid", "Validation", "val", "test"]
    files = sorted(csv_images.rglob("*.png"))
    rows = [[str(p), p.parent.name, spellings[i % 6]] for i, p in enumerate(files)]
    found = discover(write_csv(tmp_path / "s.csv", rows))
    assert {s.split for s in found.samples} == {"train", "val", "test"}
    split_of = {s.path: s.split for s in found.samples}
    assert [split_of[str(p.resolve())] for p in files[:6]] == ["train", "train", "val", "val", "val", "test"]


def test_csv_bad_split_value_names_the_line(csv_images, tmp_path):
    rows = [["blue/blue_000.png", "blue", "train"], ["blue/blue_001.png", "blue", "holdout"]]
    with pytest.raises(UserError, match=r"line 3: split must be one of train, val, test \(got 'holdout'\)"):
        discover(write_csv(csv_images / "s.csv", rows))


def test_csv_mixed_given_and_missing_splits_is_refused(csv_images):
    rows = [[f"{c}/{c}_00{i}.png", c, s] for c in ("blue", "red") for i, s in enumerate(["train", "val", ""])]
    with pytest.raises(UserError, match="some rows have a split and some do not"):
        discover(write_csv(csv_images / "s.csv", rows))


def test_csv_repeated_rows_are_dropped_and_reported_so_no_file_lands_in_two_splits(csv_images):
    files = sorted(csv_images.rglob("*.png"))
    rows = [[str(p), p.parent.name] for p in files for _ in range(3)]  # every row three times
    found = discover(write_csv(csv_images / "s.csv", rows, header=("path", "label")))
    paths = [s.path for s in found.samples]
    assert len(paths) == len(set(paths)) == len(files)
    assert any("40 repeated row(s)" in note for note in found.notes)


@pytest.mark.parametrize("second", [("red", ""), ("blue", "val")])
def test_csv_file_under_two_labels_or_splits_stops_with_the_list(csv_images, second):
    split = "train" if second[1] else ""
    rows = [[f"{c}/{c}_00{i}.png", c, split or ["train", "val", "test"][i % 3]] for c in ("blue", "red") for i in range(6)]
    if not second[1]:
        rows = [r[:2] for r in rows]
    rows.append(["./blue/blue_001.png", *(second if second[1] else second[:1])])  # same file, other spelling
    header = ("path", "label", "split") if second[1] else ("path", "label")
    with pytest.raises(UserError, match=r"lists 1 file\(s\) under different labels or splits") as caught:
        discover(write_csv(csv_images / "s.csv", rows, header=header))
    assert "blue_001.png (line 3: blue" in str(caught.value) and "line 14" in str(caught.value)


def test_csv_empty_label_names_the_line(csv_images):
    rows = [["blue/blue_000.png", "blue"], ["blue/blue_001.png", ""]]
    with pytest.raises(UserError, match="line 3: empty path or label"):
        discover(write_csv(csv_images / "s.csv", rows, header=("path", "label")))


@pytest.mark.parametrize("header", [("file", "label"), ("path", "class"), ("path",)])
def test_csv_without_path_and_label_columns(csv_images, header):
    path = write_csv(csv_images / "bad.csv", [["blue/blue_000.png", "blue"][: len(header)]], header=header)
    with pytest.raises(UserError, match="needs a header with 'path' and 'label'"):
        discover(path)


# --- labels from file names ---------------------------------------------------------------------


@pytest.fixture
def regex_folder(tmp_path) -> Path:
    folder = tmp_path / "flat"
    write_named(folder, [f"img.{i}_{10 + i}.{i % 2}.jpg" for i in range(20)] + ["unlabelled.jpg"])
    return folder


@pytest.mark.parametrize("pattern", [r"_\d+\.(\d)\.", r"^(img)\.\d+_\d+\.(?P<label>\d)\.jpg$"])
def test_label_regex(regex_folder, pattern):
    found = discover(regex_folder, label_regex=pattern)
    assert found.source == "regex" and found.labels == ["0", "1"]
    assert all(Path(s.path).name.endswith(f".{s.label}.jpg") for s in found.samples)
    assert counts(found) == {(c, s): n for c in "01" for s, n in (("train", 8), ("val", 1), ("test", 1))}
    assert found.notes == ["1 image file(s) did not match --label-regex and were left out"]


@pytest.mark.parametrize(
    "pattern, message",
    [(r"_\d+\.\d\.", "needs a group for the label"), (r"_(\d+", "is not a valid regular expression")],
)
def test_bad_label_regex(regex_folder, pattern, message):
    with pytest.raises(UserError, match=message):
        discover(regex_folder, label_regex=pattern)


# --- wrong input --------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_file_that_is_not_csv(binary_folder):
    with pytest.raises(UserError, match="is a file but not a .csv"):
        discover(binary_folder / "blue" / "blue_000.png")


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="has no class sub-folders"):
        discover(tmp_path)


def test_class_folders_without_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        discover(tmp_path)


# --- splits.csv ---------------------------------------------------------------------------------


def test_splits_csv_reproduces_the_samples(three_class_folder, tmp_path):
    found = discover(three_class_folder, seed=7)
    out = tmp_path / "run" / "splits.csv"
    out.parent.mkdir()
    write_splits_csv(found.samples, out)
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label,split" and len(lines) == 31
    assert [line.rsplit(",", 1)[1] for line in lines[1:]] == ["train"] * 24 + ["val"] * 3 + ["test"] * 3
    again = discover(out, seed=99)  # given splits: the seed no longer matters
    assert again.source == "csv"
    assert triples(again) == triples(found)
