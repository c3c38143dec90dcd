"""End-to-end `fit` on tiny synthetic data: sources, recipe options, run directory contents."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import visiontune
from tests.conftest import (
    BOMB_MAX_PIXELS,
    TINY_OPTIONS,
    write_class_folders,
    write_odd_and_bad_files,
)
from visiontune.errors import UserError


def fit(data, tmp_path: Path, **options):
    return visiontune.fit(data, out=str(tmp_path / "run"), **{**TINY_OPTIONS, **options})


def read_metrics(run) -> list[dict]:
    with (run.dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_run_directory_has_every_artifact(binary_folder, tmp_path):
    run = fit(binary_folder, tmp_path)
    names = {p.name for p in run.dir.iterdir()} | {p.name for p in (run.dir / "checkpoints").iterdir()}
    expected = {"config.yaml", "splits.csv", "labels.json", "metrics.csv", "history.png", "summary.json",
                "model.json", "best.safetensors", "last.safetensors", "state.pt"}
    assert expected <= names
    assert not [n for n in names if n.endswith(".tmp")]
    summary = run.summary
    for split in ("val", "test"):
        assert set(summary[split]) == {"accuracy", "f1_macro", "loss"}
    assert summary["best_epoch"] in (1, 2)
    assert summary["skipped"] == []
    assert {"train_s", "scan_s", "epochs_s"} <= set(summary["timings"])
    assert json.loads((run.dir / "labels.json").read_text()) == ["blue", "red"]
    rows = read_metrics(run)
    assert [r["stage"] for r in rows] == ["frozen", "unfrozen"]
    assert set(rows[0]) >= {"epoch", "lr", "train_loss", "val_loss", "val_accuracy", "val_f1_macro"}


def test_run_description_files_are_written_atomically(binary_folder, tmp_path, monkeypatch):
    """config.yaml, labels.json and model.json are moved into place whole: never seen half-written."""
    moved, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: moved.append(Path(dst).name) or real_replace(src, dst))
    fit(binary_folder, tmp_path, epochs=1)
    assert {"config.yaml", "labels.json", "model.json"} <= set(moved)


def test_splits_csv_is_complete_and_reproduces_the_run(binary_folder, tmp_path):
    run = fit(binary_folder, tmp_path)
    with (run.dir / "splits.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 24 and {r["split"] for r in rows} == {"train", "val", "test"}
    again = visiontune.fit(run.dir / "splits.csv", out=str(tmp_path / "again"), **TINY_OPTIONS)
    assert again.summary["val"] == pytest.approx(run.summary["val"])
    assert again.summary["counts"] == run.summary["counts"]


def test_saved_config_reruns_identically(binary_folder, tmp_path):
    run = fit(binary_folder, tmp_path)
    config = visiontune.TrainConfig.from_yaml(run.dir / "config.yaml", out=str(tmp_path / "rerun"))
    rerun = visiontune.fit(config=config, progress=False)
    assert read_metrics(rerun) == [
        {**row, "seconds": new["seconds"], "train_seconds": new["train_seconds"]} for row, new in zip(read_metrics(run), read_metrics(rerun))
    ]


@pytest.mark.parametrize("layout", ["folders", "split_folders", "csv", "regex"])
def test_every_data_source_trains(layout, tmp_path, binary_folder, split_folders):
    if layout == "folders":
        data, options = binary_folder, {}
    elif layout == "split_folders":
        data, options = split_folders, {}
    elif layout == "csv":
        data = tmp_path / "labels.csv"
        rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(binary_folder.rglob("*.png"))]
        data.write_text("\n".join(rows) + "\n")
        options = {}
    else:  # labels in file names, e.g. R-CNN crops img.0_73.1.png where the last number is the class
        data = tmp_path / "crops"
        data.mkdir()
        for i, path in enumerate(sorted(binary_folder.rglob("*.png"))):
            shutil.copy(path, data / f"img.{i}_{i * 7 % 100}.{int(path.parent.name == 'red')}.png")
        options = {"label_regex": r"_\d+\.(\d)\.png$"}
    run = fit(data, tmp_path, **options)
    assert len(run.labels) == 2
    assert math.isfinite(run.summary["val"]["loss"])


def test_multiclass_run_learns(tmp_path):
    data = write_class_folders(tmp_path / "three", {"blue": 20, "green": 20, "red": 20})
    run = fit(data, tmp_path, epochs=6, freeze_epochs=1, lr=1e-2)
    assert run.labels == ["blue", "green", "red"]
    assert run.summary["val"]["accuracy"] >= 0.9 and run.summary["test"]["accuracy"] >= 0.9
    rows = read_metrics(run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.parametrize(
    "option",
    [{"loss": "ce", "label_smoothing": 0.1}, {"loss": "bce"}, {"loss": "focal"}, {"loss": "focal", "focal_alpha": -1},
     {"balance": "sampler"}, {"balance": "weights"},
     {"schedule": "flat_cos"}, {"schedule": "one_cycle", "pct_start": 0.3}, {"schedule": "cosine"},
     {"augment": "light"}, {"augment": "medium"}, {"augment": "heavy"}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("classes", [2, 3])
def test_recipe_options_train(option, classes, tmp_path):
    data = write_class_folders(tmp_path / "d", dict(list({"blue": 14, "green": 6, "red": 10}.items())[:classes]))
    run = fit(data, tmp_path, **option)
    rows = read_metrics(run)
    assert len(rows) == 2
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert run.config.model_dump(include=set(option)) == option


def test_lr_follows_schedule_and_discriminative_rates(binary_folder, tmp_path):
    seen = []

    class Capture:
        def on_epoch_end(self, trainer, record):
            seen.append({g["name"]: g["lr"] for g in trainer.setup.optimizer.param_groups})

    visiontune.fit(binary_folder, out=str(tmp_path / "run"), callbacks=[Capture()],
                   **{**TINY_OPTIONS, "epochs": 3, "lr": 1e-2, "lr_mult": 20, "schedule": "cosine"})
    for lrs in seen:
        assert lrs["backbone"] == pytest.approx(lrs["head"] / 20)
    assert seen[0]["head"] < 1e-2 and seen[-1]["head"] < seen[1]["head"]


def test_default_flat_cos_holds_the_peak_for_three_quarters_of_the_stage(binary_folder, tmp_path):
    run = fit(binary_folder, tmp_path, epochs=4, freeze_epochs=0, lr=1e-2)
    head_lr = [float(row["lr"]) for row in read_metrics(run)]  # lr of each epoch's last step
    assert head_lr[:3] == [pytest.approx(1e-2)] * 3  # epoch 3 ends before 75% of the steps
    assert 0 < head_lr[3] < 0.9e-2


def test_partial_freezing_keeps_early_stages_fixed(binary_folder, tmp_path):
    seen = {}

    class Capture:
        def on_epoch_end(self, trainer, record):
            seen.update({n: p.requires_grad for n, p in trainer.setup.model.named_parameters()})

    visiontune.fit(binary_folder, out=str(tmp_path / "run"), callbacks=[Capture()], unfreeze_from="layer2",
                   **{**TINY_OPTIONS, "freeze_epochs": 0, "epochs": 1, "train_bn": False})
    early = [n for n in seen if n.startswith(("conv1.", "bn1.", "layer1."))]
    late = [n for n in seen if n.startswith(("layer2.", "layer3.", "layer4.", "fc."))]
    assert early and late
    assert not any(seen[n] for n in early)
    assert all(seen[n] for n in late)


def test_folder_of_odd_and_bad_files_trains_to_completion(tmp_path):
    data = write_class_folders(tmp_path / "d", {"blue": 10, "red": 10})
    readable, bad = write_odd_and_bad_files(data / "red")
    run = fit(data, tmp_path, max_pixels=BOMB_MAX_PIXELS)
    skipped = {Path(s["path"]).name: s["reason"] for s in run.summary["skipped"]}
    assert set(skipped) == bad
    assert "empty" in skipped["empty.png"] and "truncated" in skipped["truncated.jpg"]
    assert "decompression bomb" in skipped["bomb.png"]
    with (run.dir / "splits.csv").open() as handle:
        used = {Path(row["path"]).name for row in csv.DictReader(handle)}
    assert readable <= used and not (bad & used)
    assert run.summary["epochs_run"] == 2


def test_empty_class_folder_is_reported_and_left_out(binary_folder, tmp_path):
    (binary_folder / "green").mkdir()
    run = fit(binary_folder, tmp_path)
    assert run.labels == ["blue", "red"]
    assert run.summary["empty_classes"] == ["green"]


@pytest.mark.parametrize(
    "options, message",
    [({"epochs": 2, "freeze_epochs": 3}, "freeze_epochs"), ({"lr": -1}, "lr"), ({"schedul": "cosine"}, "did you mean 'schedule'")],
)
def test_invalid_options_raise_user_errors(binary_folder, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        fit(binary_folder, tmp_path, **options)


def test_existing_run_directory_is_not_overwritten(binary_folder, tmp_path):
    fit(binary_folder, tmp_path)
    with pytest.raises(UserError, match="--resume"):
        fit(binary_folder, tmp_path)


def test_run_that_failed_before_its_first_epoch_can_start_again(binary_folder, tmp_path):
    fit(binary_folder, tmp_path)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if it died before its first checkpoint
    with pytest.raises(UserError, match="no completed epoch"):
        visiontune.fit(resume=tmp_path / "run")
    assert fit(binary_folder, tmp_path).summary["epochs_run"] == 2


def test_exported_run_loads_in_a_fresh_process(binary_folder, tmp_path):
    import subprocess
    import sys

    run = fit(binary_folder, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    expected = run.load_model()(x)
    code = (
        "import sys, torch, visiontune\n"
        f"run = visiontune.load_run({str(run.dir)!r})\n"
        f"y = run.load_model()(torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected)
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["model"] == "test_resnet"


def test_compile_option_compiles_the_network_that_trains(binary_folder, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    fit(binary_folder, tmp_path / "plain")
    assert compiled == []
    run = fit(binary_folder, tmp_path / "compiled", compile=True)
    assert len(compiled) == 1 and run.summary["epochs_run"] == 2
    normalize, network = compiled[0]  # the device-side normaliser, then the timm model
    assert hasattr(network, "get_classifier") and isinstance(normalize, torch.nn.Module)


def test_decoded_cache_gives_the_same_run_as_decoding_every_epoch(binary_folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("VISIONTUNE_CACHE", str(cache_dir))
    options = {"augment": "light", "freeze_epochs": 1, "epochs": 2, "image_size": 32}
    cached = fit(binary_folder, tmp_path / "cached", **options)
    assert len(list(cache_dir.rglob("*.npy"))) == 24  # every image decoded once, then read from the cache
    again = fit(binary_folder, tmp_path / "again", **options)
    plain = fit(binary_folder, tmp_path / "plain", decoded_cache=False, **options)
    assert read_metrics(again)[-1]["val_loss"] == read_metrics(cached)[-1]["val_loss"]
    # uint8 rounding of the resized image is the only difference from the float path
    assert abs(float(read_metrics(plain)[-1]["val_loss"]) - float(read_metrics(cached)[-1]["val_loss"])) < 0.05
