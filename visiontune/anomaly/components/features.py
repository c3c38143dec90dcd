"""Which backbone layers the detectors use, and patch embeddings made from their feature maps.

The extractor itself is `visiontune.models.extractor` (shared with `features` and `probe`). By
default layers are chosen by their stride, so any CNN in timm gets the levels the papers used for
ResNets (stride 8 and 16 for PatchCore, 4 to 16 for PaDiM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visiontune.errors import UserError
from visiontune.models.extractor import check_layers, feature_levels


def resolve_layers(backbone: str, layers: list[str] | None, default_strides: tuple[int, ...]) -> list[str]:
    """The given layer names in network order, or the levels at the detector's default strides."""
    if layers:
        return check_layers(backbone, layers)
    chosen = [lv["module"] for lv in feature_levels(backbone) if lv["reduction"] in default_strides]
    if not chosen:
        raise UserError(f"'{backbone}' has no feature maps at stride {default_strides}; pass --layers")
    return chosen


def patch_embedding(maps: list[torch.Tensor], pool_size: int, mode: str) -> torch.Tensor:
    """Concatenate the maps at the first (finest) map's resolution: [B, sum(C), H, W].

    `pool_size` > 1 averages each position with its neighbours first (PatchCore's "locally aware"
    patches, which tolerate small misalignments); `mode` is the upsampling of coarser maps.
    """
    size = maps[0].shape[-2:]
    parts = []
    for feature_map in maps:
        if pool_size > 1:
            feature_map = F.avg_pool2d(feature_map, pool_size, stride=1, padding=pool_size // 2)
        if feature_map.shape[-2:] != size:
            feature_map = F.interpolate(feature_map, size=size, mode=mode)
        parts.append(feature_map)
    return torch.cat(parts, dim=1)
