"""Preprocessing from the backbone's own pretrained config, and augmentation presets.

As in timm, the weights decide input size, interpolation, mean/std and crop share; an explicit
`image_size` overrides only the size. Evaluation never augments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import timm.data
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2

AUGMENT_PRESETS = ("none", "light", "medium", "heavy")


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @classmethod
    def from_model(cls, model: nn.Module, image_size: int | None = None) -> Preprocessing:
        cfg = timm.data.resolve_model_data_config(model)
        return cls(
            input_size=image_size or int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
        )

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def _mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation if self.interpolation != "random" else "bilinear")

    def _to_normalized(self) -> list[nn.Module]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def eval_transform(self) -> v2.Compose:
        """Resize the shorter side to size / crop_pct, then centre-crop: timm's evaluation recipe."""
        resize = int(round(self.input_size / self.crop_pct))
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resize, interpolation=self._mode, antialias=True),
                v2.CenterCrop(self.input_size),
                *self._to_normalized(),
            ]
        )

    def train_transform(self, preset: str) -> v2.Compose:
        if preset not in AUGMENT_PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; use one of {AUGMENT_PRESETS}")
        if preset == "none":
            return self.eval_transform()
        size, mode = self.input_size, self._mode
        crop = {"light": (0.35, 1.0), "medium": (0.25, 1.0), "heavy": (0.08, 1.0)}[preset]
        steps: list[nn.Module] = [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=crop, interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if preset == "medium":
            steps += [v2.RandomRotation(15), v2.ColorJitter(0.2, 0.2, 0.2)]
        if preset == "heavy":
            steps += [v2.RandomVerticalFlip(), v2.TrivialAugmentWide(interpolation=mode)]
        steps += self._to_normalized()
        if preset == "heavy":
            steps.append(v2.RandomErasing(p=0.25))
        return v2.Compose(steps)
