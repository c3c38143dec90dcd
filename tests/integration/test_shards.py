"""Sharded predict, features and anomaly predict: 3 shards merged equal one run row for row; a
damaged or unmarked part is the only one recomputed; --shard and the launcher's environment."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import visiontune
from tests.conftest import TINY_OPTIONS, write_class_folders
from tests.unit.anomaly.conftest import write_plain
from visiontune import anomaly
from visiontune.cli.main import app, main
from visiontune.data.paths import PathList
from visiontune.data.shards import Shard, marker_path, merge_csv_shards, resolve_shard
from visiontune.errors import UserError
from visiontune.features.extraction import extract
from visiontune.features.store import load_features, merge_feature_shards
from visiontune.inference.engine import iter_logits, load_for_inference, plan_inference

runner = CliRunner()
SHARDS = [Shard(k, 3) for k in (1, 2, 3)]
FAST = {"backend": "torch", "workers": 0, "batch_size": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    data = write_class_folders(root / "data", {"blue": 6, "red": 5})
    (root / "data" / "red" / "broken.png").write_bytes(b"not an image")  # a skipped row in one shard
    run = visiontune.fit(data, out=str(root / "run"), **{**TINY_OPTIONS, "epochs": 1, "freeze_epochs": 0})
    listing = root / "list.txt"
    listing.write_text("\r\n".join(sorted(str(p) for p in data.rglob("*.png"))) + "\n\n")
    return run, data, listing


def test_sharded_predict_merges_to_the_unsharded_file_and_resumes_only_the_damaged_shard(tiny, tmp_path):
    run, _, listing = tiny
    paths = PathList.read(listing)
    assert len(paths) == 12 and paths[0].endswith("blue_000.png")  # CRLF and the blank line dropped
    whole = run.predict(paths, out=tmp_path / "whole.csv", **FAST)
    assert whole.written == 11 and len(whole.skipped) == 1
    out = tmp_path / "p.csv"
    for shard in SHARDS:
        assert not run.predict(paths, out=out, shard=shard, **FAST).shard.skipped_existing
    merge_csv_shards(out)
    assert out.read_text() == (tmp_path / "whole.csv").read_text()
    assert (tmp_path / "p.skipped.csv").read_text() == (tmp_path / "whole.skipped.csv").read_text()

    parts = [shard.part_path(out) for shard in SHARDS]
    mtimes = [p.stat().st_mtime_ns for p in parts]
    parts[1].write_text(parts[1].read_text()[:-20])  # damaged after its marker was written
    marker_path(parts[2]).unlink()  # stopped before its marker
    done = [run.predict(paths, out=out, shard=shard, **FAST).shard.skipped_existing for shard in SHARDS]
    assert done == [True, False, False]
    assert parts[0].stat().st_mtime_ns == mtimes[0] and parts[1].stat().st_mtime_ns != mtimes[1]
    merge_csv_shards(out)
    assert out.read_text() == (tmp_path / "whole.csv").read_text()


def test_merge_refuses_unfinished_shards(tiny, tmp_path):
    run, data, _ = tiny
    out = tmp_path / "p.jsonl"
    run.predict([str(data / "blue")], out=out, shard=Shard(2, 3), **FAST)
    with pytest.raises(UserError, match="shard\\(s\\) 1, 3 of 3 .* have not finished"):
        merge_csv_shards(out)


def test_sharded_features_merge_to_the_unsharded_arrays(tiny, tmp_path):
    listing = tiny[2]
    options = {"model": TINY_OPTIONS["model"], "pretrained": False, "image_size": 32, "workers": 0, "threads": 1,
               "batch_size": 4}
    whole = load_features(extract(PathList.read(listing), out=tmp_path / "whole.npz", **options)["out"])
    out = tmp_path / "f.safetensors"
    for shard in SHARDS:
        extract(PathList.read(listing), out=out, shard=shard, **options)
    merge_feature_shards(out)
    merged = load_features(out)
    np.testing.assert_array_equal(merged["features"], whole["features"])
    assert merged["paths"] == whole["paths"] and merged["meta"]["skipped"] == whole["meta"]["skipped"]


def test_sharded_anomaly_predict_merges_to_the_unsharded_scores(tmp_path):
    root = write_plain(tmp_path / "plain", n=4)
    model = anomaly.fit(root / "good", method="padim", backbone="test_resnet", pretrained=False, image_size=64,
                        layers=["layer1", "layer2"], workers=0, batch_size=4)
    model.batch_size = 1  # scores are then bitwise the same whatever the batches' neighbours
    images = [str(root / "good"), str(root / "scratch")]
    anomaly.predict(model, images, out=tmp_path / "whole.csv", heatmaps=tmp_path / "heat")
    for shard in SHARDS:
        anomaly.predict(model, images, out=tmp_path / "a.csv", heatmaps=tmp_path / "heat", shard=shard)
    result = runner.invoke(app, ["merge-shards", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "whole.csv").read_text()


@pytest.mark.parametrize(("spec", "message"), [
    ("0/3", "K must be between 1 and N=3 (shards are numbered from 1)"),
    ("4/3", "K must be between 1 and N=3"),
    ("abc", "--shard must be K/N with 1 <= K <= N"),
])
def test_bad_shard_is_one_line_exit_2(tiny, tmp_path, monkeypatch, capsys, spec, message):
    run, data, _ = tiny
    monkeypatch.setattr(sys, "argv", ["visiontune", "predict", str(run.dir), str(data), "--out",
                                      str(tmp_path / "p.csv"), "--shard", spec])
    with pytest.raises(SystemExit) as exit_info:
        main()
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error.replace("\n", "")
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_the_launchers_environment_picks_the_shard():
    assert resolve_shard(None, {"RANK": "2", "WORLD_SIZE": "4"}) == Shard(3, 4)
    assert resolve_shard(None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == Shard(1, 2)
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: not sharded
    assert resolve_shard("1/2", {"RANK": "2", "WORLD_SIZE": "4"}) == Shard(1, 2)  # --shard wins
    with pytest.raises(UserError, match="RANK=4 is outside 0..3"):
        resolve_shard(None, {"RANK": "4", "WORLD_SIZE": "4"})
    assert [Shard(k, 3).bounds(11) for k in (1, 2, 3)] == [(0, 3), (3, 7), (7, 11)]


def test_cli_predict_under_torchrun_writes_its_part(tiny, tmp_path, monkeypatch):
    run, _, listing = tiny
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(run.dir), "--files", str(listing), "--out", str(out),
                                 "--backend", "torch", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "shard 2/2" in result.output and (tmp_path / "p.part-2-of-2.csv").is_file()
    assert not (tmp_path / "p.part-1-of-2.csv").exists() and not out.exists()
    assert os.environ["RANK"] == "1"


def test_draft_decoded_jpeg_predictions_stay_within_the_stated_tolerance(tiny, tmp_path):
    run, data, _ = tiny
    for path in sorted(data.rglob("*_00[0-2].png")):  # 8x the size: decoded at 1/8 scale
        with Image.open(path) as image:
            image.resize((image.width * 8, image.height * 8), Image.BICUBIC).save(tmp_path / f"{path.stem}.jpg", quality=95)
    paths = sorted(str(p) for p in tmp_path.glob("*.jpg"))
    model, plan = load_for_inference(run, plan_inference("cpu", backend="torch", threads=1, workers=0))
    exact, draft = (np.concatenate([b.logits for b in iter_logits(model, run.preprocessing.eval_transform(), paths,
                                                                 plan=plan, draft_size=size)])
                    for size in (None, run.preprocessing.resize_size))
    probs = [np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in (exact, draft)]
    assert np.abs(probs[0] - probs[1]).max() < 0.05  # the tolerance docs/benchmarks.md states
    assert (exact.argmax(1) == draft.argmax(1)).all()
