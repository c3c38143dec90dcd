"""timm backbones with a fresh classification head and weights from the hub cache or a local file.

Weight resolution, in order: `weights` (a local file), the timm / Hugging Face cache, the hub when
it can be reached, or nothing when `pretrained` is off. Wanting weights that cannot be had stops
here with one message naming the ways out, before any data is touched.
"""

from __future__ import annotations

import difflib
import os
import pickle
import socket
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

from visiontune.errors import (
    UnsafeWeightsError,
    UserError,
    WeightsUnavailableError,
    first_line,
)

HUB_HOST = ("huggingface.co", 443)
HEAD_INIT_STD = 0.01


def create_classifier(
    name: str, num_classes: int, pretrained: bool = True, weights: str | Path | None = None
) -> nn.Module:
    """A timm model `name` with a deliberately initialised `num_classes` head.

    timm's own head init can be large (tf_efficientnet_lite0's uniform init with fan_out = 2
    reaches +-0.7), which stalls frozen-backbone training; a small normal init does not.
    """
    check_weights_available(name, pretrained, weights)
    model = create_model(name, pretrained=pretrained, weights=weights, num_classes=num_classes)
    init_head(model)
    return model


def create_model(name: str, *, pretrained: bool = False, weights: str | Path | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None, **timm_options) -> nn.Module:
    """The one place a timm model is built, whatever it is for (a classifier, a `features_only`
    extractor, a run's network, a shape probe on the meta device).

    Weights come from `state_dict` (a fine-tuned run's), `weights` (a local file, checked like
    train's), the timm / Hugging Face cache or hub when `pretrained`, or nowhere (random init).
    Callers that want the offline message before any data is read call `check_weights_available`.
    """
    if weights is not None:
        state_dict = load_weights_file(weights)
        if not timm_options.get("features_only"):
            model = timm.create_model(name, pretrained=False, **timm_options)
            load_backbone_weights(model, state_dict)
            return model
        full = timm.create_model(name, pretrained=False)
        load_backbone_weights(full, state_dict)  # same checks and messages as train
        state_dict = full.state_dict()
    if state_dict is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict},
                                 **timm_options)
    if pretrained:
        cached = cached_pretrained_file(name)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached} if cached else None,
                                 **timm_options)
    return timm.create_model(name, pretrained=False, **timm_options)


def check_weights_available(name: str, pretrained: bool, weights: str | Path | None) -> None:
    """Fail fast, before any data is read, when the model or its weights cannot be had."""
    _check_model_name(name)
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise UserError(f"weights file not found: {weights}")
    elif pretrained and cached_pretrained_file(name) is None and not _hub_reachable():
        raise WeightsUnavailableError(
            f"pretrained weights for '{name}' are not in the local cache and the model hub "
            "cannot be reached. Either connect to the internet once (timm caches the weights), "
            "pass a local file with --weights FILE, or train from scratch with --no-pretrained."
        )


def init_head(model: nn.Module) -> None:
    for module in model.get_classifier().modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=HEAD_INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def head_parameter_names(model: nn.Module) -> set[str]:
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head_ids}


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a PyTorch state dict without ever unpickling objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise UserError(f"{path} is not a valid safetensors file: {exc}") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"refusing to load {path}: it holds pickled objects other than tensors, which could run "
            f"code when loaded. Save a plain state dict or safetensors instead. ({first_line(exc)})"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError) as exc:  # KeyError: e.g. a text file
        raise UserError(f"{path} is not a readable PyTorch weights file: {first_line(exc)}") from None
    return _unwrap_state_dict(loaded, path)


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load everything but the classifier; the weights must otherwise match the architecture.

    timm ResNets use torchvision's parameter names, so torchvision ResNet state dicts load as is.
    """
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    head = {n.rsplit(".", 1)[0] for n in head_parameter_names(model)}
    is_head = lambda key: key.rsplit(".", 1)[0] in head  # noqa: E731
    usable = {k: v for k, v in state.items() if k in own and not is_head(k) and v.shape == own[k].shape}
    missing = [k for k in own if k not in usable and not is_head(k) and "num_batches_tracked" not in k]
    mismatched = [k for k, v in state.items() if k in own and not is_head(k) and v.shape != own[k].shape]
    if missing or mismatched:
        detail = ", ".join((mismatched or missing)[:3])
        raise UserError(
            f"the weights file does not fit this model: {len(missing)} of {len(own)} tensors missing "
            f"or mismatched (e.g. {detail}). Check that --model names the architecture the "
            "weights were saved from."
        )
    model.load_state_dict(usable, strict=False)


def cached_pretrained_file(name: str) -> str | None:
    """Path of the model's default weights in the HF hub or torch hub cache, if already there."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    pretrained_cfg = cfg.to_dict() if cfg is not None else {}
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        names = [pretrained_cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
        for filename in filter(None, names):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    url = pretrained_cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model '{name}'.{hint} Any name from timm.list_models() works.")


def _unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return loaded
