"""Turning `--device auto|cpu|cuda` into a torch device, with one message when CUDA is missing."""

from __future__ import annotations

import torch

from visiontune.errors import UserError


def resolve_device(device: str = "auto") -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
