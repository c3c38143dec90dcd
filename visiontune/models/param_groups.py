"""Which parameters train when: head vs backbone groups, freezing, and discriminative learning rates.

The optimizer is built once, with every group it will ever need (head and backbone, each with and
without weight decay). Freezing only flips `requires_grad`, so the optimizer's structure never
changes between stages and a resumed run rebuilds exactly the same thing: the failure mode of
callbacks that add parameter groups at unfreeze time (and lose them on resume) cannot occur.
"""

from __future__ import annotations

import difflib

from torch import nn

from visiontune.errors import UserError
from visiontune.models.backbones import head_parameter_names

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def fixed_parameter_names(model: nn.Module, unfreeze_from: str | None) -> set[str]:
    """Backbone parameters registered before module `unfreeze_from`: frozen for the whole run."""
    if not unfreeze_from:
        return set()
    names = [name for name, _ in model.named_parameters()]
    start = next(
        (i for i, n in enumerate(names) if n == unfreeze_from or n.startswith(unfreeze_from + ".")),
        None,
    )
    if start is None:
        modules = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(unfreeze_from, modules, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        top = ", ".join(name for name, _ in model.named_children())
        raise UserError(f"--unfreeze-from '{unfreeze_from}' is not a module of this model.{hint} Top-level modules: {top}")
    head = head_parameter_names(model)
    return {n for n in names[:start] if n not in head}


def build_param_groups(
    model: nn.Module, weight_decay: float, lr_mult: float, fixed: set[str]
) -> list[dict]:
    """Parameter groups with an `lr_scale` (1 for the head, 1/lr_mult for the backbone).

    Biases and normalisation parameters get no weight decay, as in timm's optimizer factory.
    """
    head = head_parameter_names(model)
    no_decay = _no_decay_names(model)
    buckets: dict[str, list] = {"head": [], "head_no_decay": [], "backbone": [], "backbone_no_decay": []}
    for name, param in model.named_parameters():
        if name in fixed:
            continue
        part = "head" if name in head else "backbone"
        buckets[part + ("_no_decay" if name in no_decay else "")].append(param)
    return [
        {
            "params": params,
            "name": key,
            "lr_scale": 1.0 if key.startswith("head") else 1.0 / lr_mult,
            "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
        }
        for key, params in buckets.items()
        if params
    ]


def apply_freezing(
    model: nn.Module, backbone_frozen: bool, train_bn: bool, fixed: set[str], bn_statistics: str = "batch"
) -> None:
    """Set `requires_grad` and BatchNorm modes for the current stage; call after `model.train()`.

    Decided per module: the head always trains; modules before `--unfreeze-from` (`fixed`) never
    do, BatchNorm statistics included; while the backbone is frozen only its norm layers train,
    and only with `train_bn` (as Lightning's BaseFinetuning does). A BatchNorm that does not train
    is put in eval mode so its running statistics stay those of the weights. Once the backbone
    trains, `bn_statistics="inference"` keeps every BatchNorm in eval mode too (pretrained running
    statistics, as Keras's transfer-learning guide advises) while its scale and shift still train.
    """
    head = head_parameter_names(model)
    for mod_name, module in model.named_modules():
        own = {f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters(recurse=False)}
        if not own:
            continue
        if own & head:
            trainable = True
        elif own & fixed:
            trainable = False
        elif backbone_frozen:
            trainable = train_bn and isinstance(module, _NORM_TYPES)
        else:
            trainable = True
        for param in module.parameters(recurse=False):
            param.requires_grad_(trainable)
        fixed_statistics = not trainable or (not backbone_frozen and bn_statistics == "inference")
        if fixed_statistics and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _no_decay_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if param.ndim <= 1 or isinstance(module, _NORM_TYPES):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names
