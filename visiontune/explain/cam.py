"""Grad-CAM through the `grad-cam` package, on the last convolutional stage of any timm CNN.

The default layer is the deepest entry of timm's `feature_info`: the last stage that still has a
spatial map, before pooling and the head. Models whose last stage is not an NCHW map (ViT, Swin)
have nothing for Grad-CAM to weigh; they are refused with a message pointing at LIME.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from visiontune.errors import UserError

NOT_A_CNN = (
    "Grad-CAM needs a convolutional feature map, but {what}. Use the LIME method instead "
    "(--method lime), which works for any model."
)


def default_layer(model: nn.Module) -> str:
    """Name of the module Grad-CAM hooks by default: timm's last feature stage, else the last Conv2d."""
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        return feature_info[-1]["module"]
    head = {id(m) for m in model.get_classifier().modules()} if hasattr(model, "get_classifier") else set()
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in head]
    if not convs:
        raise UserError(NOT_A_CNN.format(what=f"{type(model).__name__} has no convolutional layer"))
    return convs[-1]


def gradcam(
    model: nn.Module, batch: torch.Tensor, targets: list[int] | None = None, layer: str | None = None
) -> np.ndarray:
    """Heat maps [B, H, W] in [0, 1] at the input resolution; `targets` None explains the top class."""
    name = layer or default_layer(model)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"the model has no layer named {name!r}") from None
    check = module.register_forward_hook(_spatial_check(name, _feature_channels(model, name)))
    cam = GradCAM(model=model, target_layers=[module])
    try:
        # An input that requires grad makes the hooked activation require grad even when every
        # parameter is frozen, so the gradients Grad-CAM needs always exist.
        inputs = batch.detach().clone().requires_grad_(True)
        wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        with torch.enable_grad():
            heat = cam(input_tensor=inputs, targets=wanted)
    finally:
        cam.activations_and_grads.release()
        check.remove()
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


def _feature_channels(model: nn.Module, name: str) -> int | None:
    """The channel count timm documents for `name`, which tells NCHW from NHWC (Swin) maps."""
    for info in getattr(model, "feature_info", None) or []:
        if info.get("module") == name:
            return info.get("num_chs")
    return None


def _spatial_check(name: str, channels: int | None):
    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        if shape is None or len(shape) != 4 or (channels is not None and shape[1] != channels):
            found = shape or type(output).__name__
            raise UserError(NOT_A_CNN.format(what=f"layer {name!r} outputs {found}, not [B, C, H, W]"))

    return hook
