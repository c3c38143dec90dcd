"""Parameter groups (head vs backbone, decay vs none), fixed layers and per-stage freezing."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from visiontune.errors import UserError
from visiontune.models.param_groups import (
    apply_freezing,
    build_param_groups,
    fixed_parameter_names,
)

EARLY = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=3)


def group_of(groups: list[dict], model: nn.Module) -> dict[str, str]:
    """Parameter name -> name of the group holding it (fails on duplicates)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, str] = {}
    for group in groups:
        for param in group["params"]:
            name = by_id[id(param)]
            assert name not in found, f"{name} is in {found[name]} and {group['name']}"
            found[name] = group["name"]
    return found


def bn_param_names(model: nn.Module) -> set[str]:
    return {
        f"{m_name}.{p_name}"
        for m_name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for p_name, _ in module.named_parameters(recurse=False)
    }


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- build_param_groups --------------------------------------------------------------------------


def test_groups_split_head_backbone_and_decay():
    model = resnet18()
    groups = build_param_groups(model, weight_decay=0.05, lr_mult=10.0, fixed=set())
    by_name = {g["name"]: g for g in groups}
    assert {n: (g["lr_scale"], g["weight_decay"]) for n, g in by_name.items()} == {
        "head": (1.0, 0.05),
        "head_no_decay": (1.0, 0.0),
        "backbone": (pytest.approx(0.1), 0.05),
        "backbone_no_decay": (pytest.approx(0.1), 0.0),
    }
    where = group_of(groups, model)
    assert where["fc.weight"] == "head" and where["fc.bias"] == "head_no_decay"
    assert where["conv1.weight"] == "backbone" and where["layer4.1.conv2.weight"] == "backbone"
    assert {where[n] for n in bn_param_names(model)} == {"backbone_no_decay"}
    params = dict(model.named_parameters())
    for name, group in where.items():  # decay exactly for matrices / kernels
        assert group.endswith("no_decay") == (params[name].ndim <= 1), name


@pytest.mark.parametrize("unfreeze_from", [None, "layer4", "layer3.1"])
def test_every_non_fixed_parameter_is_in_exactly_one_group(unfreeze_from):
    model = resnet18()
    fixed = fixed_parameter_names(model, unfreeze_from)
    where = group_of(build_param_groups(model, 0.01, 10.0, fixed), model)
    assert set(where) == {n for n, _ in model.named_parameters()} - fixed
    assert bool(fixed) == bool(unfreeze_from)


def test_groups_of_a_tiny_efficientnet_use_its_classifier_as_head():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    where = group_of(build_param_groups(model, 0.01, 4.0, set()), model)
    assert {n for n, g in where.items() if g.startswith("head")} == {"classifier.weight", "classifier.bias"}


# -- fixed_parameter_names ----------------------------------------------------------------------


def test_fixed_parameters_are_everything_before_unfreeze_from():
    model = resnet18()
    fixed = fixed_parameter_names(model, "layer4")
    early = {n for n, _ in model.named_parameters() if n.startswith(EARLY)}
    assert fixed == early
    assert "layer1.0.bn1.weight" in fixed and "layer3.1.conv2.weight" in fixed
    assert not any(n.startswith(("layer4.", "fc.")) for n in fixed)
    assert fixed_parameter_names(model, None) == set() == fixed_parameter_names(model, "")


def test_fixed_never_includes_the_head_even_when_unfreezing_from_it():
    model = resnet18()
    fixed = fixed_parameter_names(model, "fc")
    assert "fc.weight" not in fixed and "layer4.1.conv2.weight" in fixed


def test_head_registered_first_is_never_fixed():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.stem, self.body = nn.Linear(4, 2), nn.Linear(4, 4), nn.Linear(4, 4)

        def get_classifier(self) -> nn.Module:
            return self.fc

    assert fixed_parameter_names(HeadFirst(), "body") == {"stem.weight", "stem.bias"}


def test_unknown_unfreeze_from_lists_modules():
    with pytest.raises(UserError) as info:
        fixed_parameter_names(resnet18(), "layer5")
    message = str(info.value)
    assert "--unfreeze-from 'layer5' is not a module of this model" in message
    assert "Did you mean: layer" in message
    assert "Top-level modules: conv1, bn1, act1, maxpool, layer1, layer2, layer3, layer4, global_pool, fc" in message


# -- apply_freezing ------------------------------------------------------------------------------


def test_frozen_with_train_bn_trains_head_and_batchnorm_only():
    model = resnet18()
    model.train()
    apply_freezing(model, backbone_frozen=True, train_bn=True, fixed=set())
    assert trainable(model) == {"fc.weight", "fc.bias"} | bn_param_names(model)
    assert all(m.training for m in model.modules())


def test_frozen_without_train_bn_trains_head_only_and_freezes_bn_statistics():
    model = resnet18()
    model.train()
    apply_freezing(model, backbone_frozen=True, train_bn=False, fixed=set())
    assert trainable(model) == {"fc.weight", "fc.bias"}
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 20 and not any(m.training for m in batchnorms)
    assert model.training and model.fc.training and model.layer1[0].conv1.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


@pytest.mark.parametrize("train_bn", [True, False])
def test_unfrozen_trains_everything_but_fixed(train_bn):
    model = resnet18()
    fixed = fixed_parameter_names(model, "layer4")
    model.train()
    apply_freezing(model, backbone_frozen=True, train_bn=train_bn, fixed=fixed)  # the stage before
    model.train()
    apply_freezing(model, backbone_frozen=False, train_bn=train_bn, fixed=fixed)
    everything = {n for n, _ in model.named_parameters()}
    assert trainable(model) == everything - fixed
    assert model.layer4[1].bn2.training and model.fc.training
    # Layers before --unfreeze-from are frozen for good, BatchNorm statistics included.
    assert not model.layer1[0].bn1.training
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.layer1[0].bn1.running_mean, before)


@pytest.mark.parametrize("frozen", [True, False])
def test_only_optimised_parameters_receive_gradients(frozen):
    """Fixed parameters are in no group: a gradient for them would be a wasted backward pass."""
    model = resnet18()
    fixed = fixed_parameter_names(model, "layer4")
    optimised = set(group_of(build_param_groups(model, 0.01, 10.0, fixed), model))
    model.train()
    apply_freezing(model, backbone_frozen=frozen, train_bn=True, fixed=fixed)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= optimised
    assert "fc.weight" in with_grad and "layer4.1.bn2.weight" in with_grad
    assert model.conv1.weight.grad is None and model.bn1.weight.grad is None
