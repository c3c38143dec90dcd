"""Preprocessing from the backbone's own pretrained config, and augmentation presets.

As in timm, the weights decide input size, interpolation, mean/std and crop share; an explicit
`image_size` overrides only the size. Evaluation never augments.

With `normalize=False` the transforms stop at uint8 CHW tensors (a quarter of the bytes through
DataLoader workers, pinned memory and the host-to-device copy) and `Preprocessing.normalizer()`
turns the batch into normalised floats on the device. Both take either a PIL image or a cached,
already-resized uint8 tensor (`visiontune.data.cache`): the Resize step leaves the latter as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm.data
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2

AUGMENT_PRESETS = ("none", "light", "medium", "heavy", "texture")
# Smallest share of the image area a RandomResizedCrop keeps, per preset (`crop_scale` overrides).
CROP_SCALES = {"light": 0.35, "medium": 0.25, "heavy": 0.08, "texture": 0.8}


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"  # or "squash": the whole image resized to a square (timm's crop_mode)

    @classmethod
    def from_model(cls, model: nn.Module, image_size: int | None = None, crop_mode: str | None = None) -> Preprocessing:
        """The weights' preprocessing; `image_size` and `crop_mode` override when not None."""
        cfg = timm.data.resolve_model_data_config(model)
        default_mode = str(cfg.get("crop_mode", "center"))
        return cls(
            input_size=image_size or int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            crop_mode=crop_mode or (default_mode if default_mode == "squash" else "center"),
        )

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def _mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation if self.interpolation != "random" else "bilinear")

    @property
    def _tensor_affine_mode(self) -> InterpolationMode:
        """torchvision's affine kernels on tensors (TrivialAugment's rotate, shear, translate) take
        only nearest or bilinear; bicubic backbones (resnet, efficientnet) use bilinear there."""
        mode = self._mode
        return mode if mode in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR) else InterpolationMode.BILINEAR

    @property
    def resize_size(self) -> int:
        """The evaluation resize of the shorter side (size / crop_pct), also what the decoded cache stores."""
        return round(self.input_size / self.crop_pct)

    def _to_normalized(self) -> list[nn.Module]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def normalizer(self) -> UInt8Normalizer:
        """The device-side end of the `normalize=False` transforms: uint8 NCHW -> normalised float."""
        return UInt8Normalizer(self.mean, self.std)

    def _resize(self) -> v2.Resize:
        """The shorter side (center) or both sides (squash) to size / crop_pct; a no-op on cached images."""
        size = [self.resize_size, self.resize_size] if self.crop_mode == "squash" else self.resize_size
        return v2.Resize(size, interpolation=self._mode, antialias=True)

    def eval_transform(self, normalize: bool = True) -> v2.Compose:
        """Resize to size / crop_pct, then centre-crop: timm's evaluation recipe."""
        return v2.Compose(
            [v2.ToImage(), self._resize(), v2.CenterCrop(self.input_size), *(self._to_normalized() if normalize else [])]
        )

    def train_transform(self, preset: str, normalize: bool = True, crop_scale: float | None = None) -> v2.Compose:
        """Augmented training transform; with normalize=False every step runs on uint8 (see module doc).

        `crop_scale` is the smallest share of the area a random crop keeps (default per preset).
        texture is for surfaces and defects, where orientation carries no meaning and a small
        defect must stay in the crop: flips, 90-degree turns, large crops, mild light changes.
        """
        if preset not in AUGMENT_PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; use one of {AUGMENT_PRESETS}")
        if preset == "none":
            return self.eval_transform(normalize)
        size, mode = self.input_size, self._mode
        crop = (crop_scale or CROP_SCALES[preset], 1.0)
        steps: list[nn.Module] = [v2.ToImage()]
        if self.crop_mode == "squash":  # crops are taken from the squashed image, as evaluation sees it
            steps.append(self._resize())
        steps += [
            v2.RandomResizedCrop(size, scale=crop, interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if preset == "texture":
            steps += [v2.RandomVerticalFlip(), RandomQuarterTurn(), v2.ColorJitter(brightness=0.1, contrast=0.1)]
        if preset == "medium":
            steps += [v2.RandomRotation(15), v2.ColorJitter(0.2, 0.2, 0.2)]
        if preset == "heavy":
            steps += [v2.RandomVerticalFlip(), v2.TrivialAugmentWide(interpolation=self._tensor_affine_mode)]
        if normalize:
            steps += self._to_normalized()
        if preset == "heavy":
            # Erasing writes 0 in normalised space, which is the mean colour; on uint8 the mean
            # colour is written instead, so both paths erase to the same values up to rounding.
            steps.append(v2.RandomErasing(p=0.25, value=0 if normalize else self.mean_uint8))
        return v2.Compose(steps)

    @property
    def mean_uint8(self) -> list[int]:
        return [round(m * 255) for m in self.mean]


class RandomQuarterTurn(nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees, exactly (no resampling), drawn from torch's generator."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(4, ()))
        return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


class UInt8Normalizer(nn.Module):
    """(x / 255 - mean) / std as one multiply-add, on whatever device the batch is on.

    Floating-point batches pass through unchanged: they come from the `normalize=True` transforms
    and are normalised already, so a loop can apply this to every batch whichever transform fed it.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t, persistent=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.is_floating_point():
            return batch
        scale, shift = self.scale.to(batch.device), self.shift.to(batch.device)  # no-ops once moved
        return batch.float().mul_(scale).add_(shift)  # twice as fast as addcmul on CPU here
