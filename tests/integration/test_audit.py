"""`visiontune audit` end to end on synthetic images with a planted label flip and a planted
cross-split near-duplicate, then `train --exclude / --relabel` with its findings."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import COLOURS, TINY_OPTIONS
from tests.integration.test_cli import cli
from visiontune.cli.main import app


def pattern(colour: tuple[int, int, int], seed: int, size: int = 48) -> Image.Image:
    """A class colour modulated by a random coarse pattern: every image distinct, classes separable."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.uniform(0, 255, (6, 6))).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = (0.75 + 0.25 * np.asarray(coarse)[..., None] / 255) * np.array(colour) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def planted_data(root: Path) -> Path:
    for s, (split, count) in enumerate((("train", 16), ("val", 6))):
        for k, name in enumerate(("blue", "red")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pattern(COLOURS[name], 1000 * s + 100 * k + i).save(root / split / name / f"{name}_{i}.png")
    pattern(COLOURS["red"], 4242).save(root / "train" / "blue" / "flipped.png")  # a red image labelled blue
    # the same pixels in other bytes, in val (the benchmark measures resized, cropped, JPEG copies)
    with Image.open(root / "train" / "red" / "red_3.png") as image:
        image.save(root / "val" / "red" / "leak.png", compress_level=1)
    (root / "val" / "red" / "broken.png").write_bytes(b"not an image")
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_audit_finds_planted_problems_writes_only_out_and_train_applies_the_decisions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = planted_data(tmp_path / "data")
    before, around = snapshot(data), set(tmp_path.iterdir())
    result = CliRunner().invoke(app, [
        "audit", str(data), "--model", TINY_OPTIONS["model"], "--no-pretrained", "--image-size", "32",
        "--workers", "0", "--duplicate-similarity", "0.99999", "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.output  # unreadable: skipped and listed
    assert snapshot(data) == before and set(tmp_path.iterdir()) == around | {tmp_path / "audit"}
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["findings.csv", "findings.json", "report.html"]

    rows = list(csv.DictReader((tmp_path / "audit" / "findings.csv").open()))
    issues = [r for r in rows if r["kind"] == "label_issue"]
    assert (Path(issues[0]["path"]).name, issues[0]["given_label"], issues[0]["suggested_label"]) == (
        "flipped.png", "blue", "red")
    leaks = [r for r in rows if r["kind"] == "leakage"]
    assert (Path(leaks[0]["path"]).name, Path(leaks[0]["other_path"]).name, leaks[0]["exact"]) == (
        "leak.png", "red_3.png", "False")
    record = json.loads((tmp_path / "audit" / "findings.json").read_text())
    assert record["images"] == 46 and [s["path"] for s in record["skipped"]] == [str(data / "val/red/broken.png")]
    page = (tmp_path / "audit" / "report.html").read_text()
    assert "flipped.png" in page and page.count("data:image/png;base64,") >= 3

    (tmp_path / "exclude.csv").write_text("path\n" + leaks[0]["path"] + "\n")
    (tmp_path / "relabel.csv").write_text("path,suggested_label\n" + issues[0]["path"] + ",red\n")
    options = ["--model", TINY_OPTIONS["model"], "--no-pretrained", "--image-size", "32", "--epochs", "1",
               "--freeze-epochs", "1", "--no-probe", "--workers", "0", "--no-report", "--batch-size", "8"]
    result = CliRunner().invoke(app, ["train", str(data), *options, "--exclude", "exclude.csv",
                                      "--relabel", "relabel.csv", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    curation = json.loads((tmp_path / "run" / "summary.json").read_text())["curation"]
    assert curation["excluded"] == [leaks[0]["path"]]
    assert curation["relabelled"] == [{"path": issues[0]["path"], "from": "blue", "to": "red"}]
    splits = {r["path"]: r["label"] for r in csv.DictReader((tmp_path / "run" / "splits.csv").open())}
    assert leaks[0]["path"] not in splits and splits[issues[0]["path"]] == "red"
    assert snapshot(data) == before


def test_audit_fine_tune_trains_one_run_per_fold_and_leaves_only_its_findings(tmp_path):
    data = planted_data(tmp_path / "data")
    before = snapshot(data)
    result = CliRunner().invoke(app, [
        "audit", str(data), "--model", TINY_OPTIONS["model"], "--no-pretrained", "--image-size", "32",
        "--workers", "0", "--fine-tune", "--folds", "2", "--epochs", "1", "--batch-size", "8",
        "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert "2 folds (fine-tune)" in result.output
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["findings.csv", "findings.json", "report.html"]
    record = json.loads((tmp_path / "audit" / "findings.json").read_text())
    assert record["out_of_fold"] == "fine-tune" and len(record["fold_runs"]) == 2
    assert sum(f["held_out"] for f in record["fold_runs"]) == record["images"] == 46
    for fold in record["fold_runs"]:
        assert fold["trained_on"] + fold["validated_on"] + fold["held_out"] == 46
    assert snapshot(data) == before


def test_check_near_duplicates_lists_the_planted_leak_from_a_backbone_or_a_features_file(tmp_path):
    data = planted_data(tmp_path / "data")
    backbone = ["--model", TINY_OPTIONS["model"], "--no-pretrained", "--image-size", "32"]
    result = CliRunner().invoke(app, ["check", str(data), "--near-duplicates", *backbone,
                                      "--duplicate-similarity", "0.99999"])
    assert result.exit_code == 0, result.output  # leaked near-duplicates warn; they are not errors
    assert "near-duplicates across splits (leakage) (1," in result.output
    assert "val:" + str(data / "val/red/leak.png") + " ~ train:" + str(data / "train/red/red_3.png") in result.output
    assert "1 near-duplicate pair(s) span splits" in result.output

    features = tmp_path / "features.npz"
    made = CliRunner().invoke(app, ["features", str(data), *backbone, "--workers", "0", "--out", str(features)])
    assert made.exit_code == 0, made.output
    again = CliRunner().invoke(app, ["check", str(data), "--near-duplicates", "--features", str(features),
                                     "--duplicate-similarity", "0.99999"])
    assert again.exit_code == 0 and "leak.png" in again.output and "red_3.png" in again.output

    missing = cli("check", data, "--near-duplicates")
    assert missing.returncode == 2 and "needs features" in missing.stderr and "Traceback" not in missing.stderr
    both = cli("check", data, "--near-duplicates", "--features", features, "--model", TINY_OPTIONS["model"])
    assert both.returncode == 2 and "leave out --model" in both.stderr
