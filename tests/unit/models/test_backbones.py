"""create_classifier: head init, names, weight resolution (offline, local files) and pickle safety."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub import constants as hf_constants

from tests.conftest import TINY_MODEL
from visiontune.errors import UnsafeWeightsError, UserError, WeightsUnavailableError
from visiontune.models.backbones import (
    HEAD_INIT_STD,
    check_weights_available,
    create_classifier,
    head_parameter_names,
    load_weights_file,
)


class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def perturbed_source(name: str, num_classes: int = 5) -> dict[str, torch.Tensor]:
    """A state dict no freshly created model could match by chance (buffers included)."""
    torch.manual_seed(123)
    state = timm.create_model(name, pretrained=False, num_classes=num_classes).state_dict()
    return {k: v + torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


def backbone_keys(model: torch.nn.Module) -> list[str]:
    head = {n.rsplit(".", 1)[0] for n in head_parameter_names(model)}
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] not in head]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights in the HF or torch hub caches, offline, and any network attempt fails the test."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


# -- the head ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY_MODEL, "test_efficientnet"])
def test_head_is_small_normal_with_zero_bias_and_right_shape(name):
    torch.manual_seed(0)
    model = create_classifier(name, num_classes=10, pretrained=False)
    head = model.get_classifier()
    assert head.out_features == 10
    assert 0.8 * HEAD_INIT_STD < head.weight.std().item() < 1.2 * HEAD_INIT_STD
    assert torch.count_nonzero(head.bias) == 0
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_efficientnet_lite_head_avoids_timms_large_default_init():
    torch.manual_seed(0)
    default = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    ours = create_classifier("tf_efficientnet_lite0", num_classes=2, pretrained=False)
    assert default.get_classifier().weight.abs().max().item() > 0.5  # the pitfall being guarded
    assert ours.get_classifier().weight.abs().max().item() < 0.1


# -- names and availability ----------------------------------------------------------------------


@pytest.mark.parametrize(("typo", "suggestion"), [("resnet5O", "resnet50"), ("resnett18", "resnet18")])
def test_unknown_model_suggests_close_names(typo, suggestion):
    with pytest.raises(UserError, match=rf"unknown model '{typo}'\. Did you mean: .*\b{suggestion}\b"):
        create_classifier(typo, num_classes=2, pretrained=False)


def test_offline_uncached_pretrained_fails_fast_naming_all_ways_out(empty_caches):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        create_classifier(TINY_MODEL, num_classes=2, pretrained=True)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    for way_out in ("--weights", "--no-pretrained", "internet", "cache"):
        assert way_out in message
    assert f"'{TINY_MODEL}'" in message


def test_unreachable_hub_when_online_is_also_unavailable(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    attempts = []

    def refused(address, timeout=None):
        attempts.append(address)
        raise OSError("connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(WeightsUnavailableError):
        check_weights_available(TINY_MODEL, pretrained=True, weights=None)
    assert attempts == [("huggingface.co", 443)]


def test_weights_in_hf_cache_count_as_available_offline(empty_caches):
    hub_id = timm.models.get_pretrained_cfg(TINY_MODEL).to_dict()["hf_hub_id"]
    repo = empty_caches / "hf" / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    check_weights_available(TINY_MODEL, pretrained=True, weights=None)  # no error, no network


def test_no_pretrained_needs_no_weights(empty_caches):
    check_weights_available(TINY_MODEL, pretrained=False, weights=None)


# -- --weights files -----------------------------------------------------------------------------


def _save_safetensors(state, path):
    safetensors.torch.save_file(state, str(path))


WRITERS = {
    "safetensors": ("w.safetensors", _save_safetensors),
    "plain": ("w.pt", lambda state, path: torch.save(state, path)),
    "state_dict": ("w.pth", lambda state, path: torch.save({"state_dict": state, "epoch": 3}, path)),
    "model": ("w.bin", lambda state, path: torch.save({"model": state}, path)),
    "dataparallel": ("w.pt", lambda state, path: torch.save({f"module.{k}": v for k, v in state.items()}, path)),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_weights_file_loads_backbone_and_keeps_a_fresh_head(tmp_path, fmt):
    source = perturbed_source(TINY_MODEL, num_classes=5)
    filename, write = WRITERS[fmt]
    write(source, tmp_path / filename)
    model = create_classifier(TINY_MODEL, num_classes=2, pretrained=True, weights=tmp_path / filename)
    state = model.state_dict()
    keys = backbone_keys(model)
    assert len(keys) > 10
    for key in keys:
        assert torch.equal(state[key], source[key]), key
    head = model.get_classifier()
    assert head.weight.shape == (2, source["fc.weight"].shape[1])
    assert head.weight.abs().max().item() < 0.1 and torch.count_nonzero(head.bias) == 0


def test_torchvision_resnet18_state_dict_loads_into_timm_resnet18(tmp_path):
    torch.manual_seed(1)
    tv_state = torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()
    torch.save(tv_state, tmp_path / "tv.pth")
    model = create_classifier("resnet18", num_classes=3, pretrained=False, weights=tmp_path / "tv.pth")
    state = model.state_dict()
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(state[key], tv_state[key]), key
    assert state["fc.weight"].shape == (3, 512)


@pytest.mark.parametrize("dump", ["torch.save", "pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, dump):
    import pickle

    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"x": Evil(marker), "conv1.weight": torch.zeros(1)}
    if dump == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeWeightsError, match="refusing to load .*pickled objects"):
        create_classifier(TINY_MODEL, num_classes=2, weights=path)
    assert not marker.exists()


def test_weights_of_another_architecture_do_not_fit(tmp_path):
    torch.save(perturbed_source("test_efficientnet"), tmp_path / "effnet.pt")
    with pytest.raises(UserError, match="does not fit this model"):
        create_classifier(TINY_MODEL, num_classes=2, weights=tmp_path / "effnet.pt")


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="weights file not found: .*nope.safetensors"):
        create_classifier(TINY_MODEL, num_classes=2, weights=missing)
    with pytest.raises(UserError, match="weights file not found"):
        load_weights_file(missing)


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("w.pt", b"just some text, not weights", "not a readable PyTorch weights file"),
        ("w.pt", b"", "not a readable PyTorch weights file"),
        ("w.safetensors", b"just some text, not weights", "not a valid safetensors file"),
    ],
)
def test_unreadable_weights_files_are_user_errors(tmp_path, filename, content, message):
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_weights_file(tmp_path / filename)


def test_non_state_dict_file_is_a_user_error(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(UserError, match="does not hold a state dict"):
        load_weights_file(tmp_path / "list.pt")
