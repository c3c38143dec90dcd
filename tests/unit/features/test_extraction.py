"""Feature files: shapes per pooling and layer, both formats, projections, streaming, run backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from tests.conftest import TINY_MODEL, TINY_OPTIONS, write_class_folders
from visiontune.data import batches
from visiontune.data.images import load_rgb
from visiontune.data.sources import discover
from visiontune.errors import UserError
from visiontune.features import store as feature_store
from visiontune.features.extraction import extract
from visiontune.features.store import load_features
from visiontune.training.finetune import fit

TINY = {"model": TINY_MODEL, "pretrained": False, "image_size": 32, "workers": 0, "threads": 1}
CHANNELS = {"layer2": 48, "layer4": 96}  # test_resnet's feature_info


@pytest.fixture
def colours(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "colours", {"blue": 10, "green": 10, "red": 10})


def test_pooled_and_spatial_shapes_agree_across_layers(colours, tmp_path):
    layers = ["layer4", "layer2"]  # returned in network order whatever the order given
    avg = extract(colours, out=tmp_path / "avg.npz", layers=layers, pool="avg", **TINY)
    grids = extract(colours, out=tmp_path / "grid.npz", layers=layers, pool="none", **TINY)
    maxed = extract(colours, out=tmp_path / "max.npz", layers=layers, pool="max", **TINY)
    assert avg["layers"] == ["layer2", "layer4"]
    assert avg["arrays"] == {"features": [30, 48 + 96]} == maxed["arrays"]
    assert grids["arrays"] == {"features.layer2": [30, 4, 4, 48], "features.layer4": [30, 1, 1, 96]}
    pooled, spatial = load_features(tmp_path / "avg.npz"), load_features(tmp_path / "grid.npz")
    biggest = load_features(tmp_path / "max.npz")["features"]
    by_hand = np.concatenate([spatial[f"features.{name}"].mean(axis=(1, 2)) for name in ("layer2", "layer4")], axis=1)
    np.testing.assert_allclose(pooled["features"], by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(biggest[:, :48], spatial["features.layer2"].max(axis=(1, 2)), rtol=1e-6)
    assert (biggest >= pooled["features"] - 1e-6).all() and (biggest > pooled["features"] + 1e-3).any()


def test_npz_and_safetensors_hold_the_same_rows_with_paths_labels_and_splits(colours, tmp_path):
    extract(colours, out=tmp_path / "f.npz", **TINY)
    extract(colours, out=tmp_path / "f.safetensors", **TINY)
    npz, st = load_features(tmp_path / "f.npz"), load_features(tmp_path / "f.safetensors")
    raw = safetensors.numpy.load_file(str(tmp_path / "f.safetensors"))  # the library reads our file
    np.testing.assert_array_equal(raw["features"], npz["features"])
    expected = discover(colours).samples  # the split `train` would use
    for loaded in (npz, st):
        assert loaded["paths"] == [s.path for s in expected]
        assert loaded["splits"] == [s.split for s in expected]
        assert loaded["classes"] == ["blue", "green", "red"]
        assert [loaded["classes"][i] for i in loaded["labels"]] == [s.label for s in expected]
        assert loaded["features"].dtype == np.float32 and loaded["meta"]["layers"] == ["layer4"]
    np.testing.assert_array_equal(npz["features"], st["features"])


def test_features_take_predicts_device_decoding_where_the_device_decodes_jpegs(tmp_path, monkeypatch):
    """On CUDA, `features` decodes JPEGs on the GPU as `predict` does; the same code runs here with
    the CPU standing in for the device (torchvision's libjpeg instead of nvJPEG)."""
    jpegs = write_class_folders(tmp_path / "jpegs", {"blue": 4, "red": 4}, ext=".jpg")
    reference = extract(jpegs, out=tmp_path / "cpu.npz", **TINY)
    calls = []
    real = batches.iter_jpeg_batches

    def recording(paths, *args, **kwargs):
        calls.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(batches, "decodes_on_device", lambda device: True)
    monkeypatch.setattr(batches, "iter_jpeg_batches", recording)
    on_device = extract(jpegs, out=tmp_path / "device.npz", **TINY)
    assert calls == [8] and on_device["arrays"] == reference["arrays"] == {"features": [8, 96]}
    a, b = load_features(tmp_path / "cpu.npz"), load_features(tmp_path / "device.npz")
    assert a["paths"] == b["paths"]
    # another build of libjpeg and a tensor resize: near (equal on the machine this was written on)
    np.testing.assert_allclose(b["features"], a["features"], atol=0.05 * np.abs(a["features"]).max())


def test_projections_have_the_asked_dimension_and_pca_is_fitted_on_train(colours, tmp_path):
    first = extract(colours, out=tmp_path / "r1.npz", project_dim=5, projection="random", **TINY)
    extract(colours, out=tmp_path / "r2.npz", project_dim=5, projection="random", **TINY)
    assert first["arrays"]["features"] == [30, 5]
    np.testing.assert_array_equal(load_features(tmp_path / "r1.npz")["features"],
                                  load_features(tmp_path / "r2.npz")["features"])  # seeded
    extract(colours, out=tmp_path / "pca.npz", project_dim=4, projection="pca", **TINY)
    pca = load_features(tmp_path / "pca.npz")
    train = np.array(pca["splits"]) == "train"
    assert pca["features"].shape == (30, 4) and pca["meta"]["projection"]["kind"] == "pca"
    np.testing.assert_allclose(pca["features"][train].mean(axis=0), 0, atol=1e-4)  # centred on train rows only
    assert np.abs(pca["features"][~train].mean(axis=0)).max() > 1e-3
    with pytest.raises(UserError, match="needs at least 500 training images"):
        extract(colours, out=tmp_path / "big.npz", project_dim=500, projection="pca", **TINY)
    with pytest.raises(UserError, match="pooled"):
        extract(colours, out=tmp_path / "x.npz", project_dim=4, pool="none", **TINY)


def test_rows_stream_to_disk_batch_by_batch_and_bad_files_are_listed(colours, tmp_path, monkeypatch):
    (colours / "red" / "broken.png").write_bytes(b"not a png")
    appended = []
    original = feature_store.RowArrays.append

    def spy(self, batch):
        appended.append(len(next(iter(batch.values()))) if batch else 0)
        assert all(isinstance(a, np.memmap) for a in self.arrays.values())  # rows live on disk, not in a list
        original(self, batch)

    monkeypatch.setattr(feature_store.RowArrays, "append", spy)
    result = extract(colours, out=tmp_path / "out" / "f.npz", batch_size=4, **TINY)
    assert max(appended) <= 4 and len(appended) == 8 and sum(appended) == 30
    assert result["images"] == 30 and [Path(s["path"]).name for s in result["skipped"]] == ["broken.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.npz"]  # temporaries removed


def test_unknown_layer_and_bad_suffix_are_user_errors(colours, tmp_path):
    with pytest.raises(UserError, match="unknown layer.*nope.*choose from act1, layer1, layer2, layer3, layer4"):
        extract(colours, out=tmp_path / "f.npz", layers=["nope"], **TINY)
    with pytest.raises(UserError, match=r"\.npz or \.safetensors"):
        extract(colours, out=tmp_path / "f.csv", **TINY)
    with pytest.raises(UserError, match="not both or neither"):
        extract(colours, out=tmp_path / "f.npz", run=tmp_path, **TINY)


def test_features_of_a_run_equal_its_backbone_run_directly(tmp_path):
    data = write_class_folders(tmp_path / "data", {"blue": 8, "red": 8})
    run = fit(data, **{**TINY_OPTIONS, "out": str(tmp_path / "run")})
    result = extract(data, run=run.dir, out=tmp_path / "run.npz", workers=0)
    stored = load_features(tmp_path / "run.npz")
    model, transform = run.load_model(), run.preprocessing.eval_transform()
    images = torch.stack([transform(load_rgb(path, run.config.max_pixels)) for path in stored["paths"]])
    with torch.inference_mode():
        expected = model.forward_features(images).mean(dim=(2, 3)).numpy()
    assert result["layers"] == ["layer4"] and stored["meta"]["run"] == str(run.dir)
    assert len(stored["paths"]) == 16
    np.testing.assert_allclose(stored["features"], expected, atol=1e-5, rtol=1e-5)


def test_a_list_of_files_gives_unlabelled_unsplit_rows_that_probe_refuses(colours, tmp_path):
    from visiontune.features.probes import probe

    files = sorted(str(p) for p in (colours / "red").glob("*.png"))[:3]
    result = extract([*files, colours / "blue"], out=tmp_path / "list.npz", project_dim=3, projection="pca", **TINY)
    stored = load_features(tmp_path / "list.npz")
    assert result["images"] == 13 and stored["paths"][:3] == files
    assert (stored["labels"] == -1).all() and set(stored["splits"]) == {""} and stored["classes"] == []
    assert stored["meta"]["projection"]["fitted_on"] == "all rows"
    with pytest.raises(UserError, match="unlabelled"):
        probe(tmp_path / "list.npz", out=tmp_path / "probe")
