"""The frozen image encoder of a caption run and its cached features.

`grid`: the last requested level's feature map, one memory cell per grid position. `pooled`: that
map averaged to one vector (a single memory cell: no spatial layout left, the setup that loses
"left of"). `multi`: several levels, each averaged to the coarsest level's grid and concatenated
along channels. Channels and grid come from the backbone's `feature_info` and a shape probe, so
the decoder is always built for exactly what the encoder gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError
from visiontune.models.extractor import FeatureExtractor, check_layers, feature_levels, iter_features

FEATURE_MODES = ("grid", "pooled", "multi")


@dataclass(frozen=True)
class EncoderSpec:
    backbone: str
    layers: tuple[str, ...]
    features: str
    channels: int
    grid: tuple[int, int]  # memory cells as rows x columns (1 x 1 when pooled)

    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "layers": list(self.layers), "features": self.features,
                "channels": self.channels, "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, values: dict) -> EncoderSpec:
        return cls(values["backbone"], tuple(values["layers"]), values["features"], int(values["channels"]),
                   (int(values["grid"][0]), int(values["grid"][1])))


def encoder_layers(backbone: str, features: str, layers: Sequence[str] | None) -> list[str]:
    """The backbone levels `features` reads (default: the last; multi: the last two), checked."""
    if features not in FEATURE_MODES:
        raise UserError(f"--features must be one of {', '.join(FEATURE_MODES)}, not {features!r}")
    if features == "multi" and not layers:
        layers = [level["module"] for level in feature_levels(backbone)[-2:]]
    chosen = check_layers(backbone, layers)
    if features != "multi" and len(chosen) > 1:
        raise UserError(f"--features {features} uses one layer; give one --layers name or use --features multi")
    return chosen


def encoder_spec(backbone: str, features: str, layers: Sequence[str] | None, input_size: int) -> EncoderSpec:
    """What the encoder will output for `input_size` images; an impossible setting is one message."""
    chosen = encoder_layers(backbone, features, layers)
    by_name = {level["module"]: level for level in feature_levels(backbone)}
    coarsest = max(by_name[name]["reduction"] for name in chosen)
    side = -(-input_size // coarsest)  # ceil: timm's convolutions pad
    if side < 1:
        raise UserError(f"input size {input_size} is too small for {backbone}'s {chosen[-1]}")
    grid = (1, 1) if features == "pooled" else (side, side)
    return EncoderSpec(backbone, tuple(chosen), features, sum(by_name[name]["num_chs"] for name in chosen), grid)


def to_memory(maps: Sequence[torch.Tensor], spec: EncoderSpec) -> torch.Tensor:
    """Feature maps [B, C, H, W] (channels first) -> memory [B, T, C] as the spec says."""
    if spec.features == "pooled":
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)[:, None]
    size = maps[-1].shape[-2:]
    joined = torch.cat([m if m.shape[-2:] == size else F.adaptive_avg_pool2d(m, size) for m in maps], dim=1)
    if tuple(size) != spec.grid:
        raise UserError(f"the encoder gave a {tuple(size)} grid, not the run's {spec.grid}: images must be resized "
                        "to the run's input size")
    return joined.flatten(2).transpose(1, 2)


def encode_files(extractor: FeatureExtractor, spec: EncoderSpec, preprocessing: Preprocessing, paths: Sequence[str],
                 batch_size: int = 32, workers: int = 0, device: torch.device | str = "cpu",
                 max_pixels: int | None = None) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Memory [N_readable, T, C] as float16 (half the RAM of a cached training set), the positions
    in `paths` it belongs to, and the (position, reason) of files that could not be read."""
    options = {"max_pixels": max_pixels} if max_pixels else {}
    chunks, kept, skipped = [], [], []
    for batch in iter_features(extractor, preprocessing.eval_transform(), paths, pool="none", batch_size=batch_size,
                               workers=workers, device=device, **options):
        skipped += batch.skipped
        if batch.arrays:
            maps = [torch.from_numpy(batch.arrays[f"features.{layer}"]).permute(0, 3, 1, 2) for layer in spec.layers]
            chunks.append(to_memory(maps, spec).half())
            kept += batch.indices
    memory = torch.cat(chunks) if chunks else torch.zeros(0, spec.grid[0] * spec.grid[1], spec.channels,
                                                          dtype=torch.float16)
    return memory, kept, skipped
