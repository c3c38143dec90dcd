"""Atomic checkpoint files: a reader sees the old file or the new one, never half of one.

Model weights are safetensors with the run's metadata (labels, preprocessing, backbone, config) in
their header, so one file is a complete model. The resume state (model, optimizer, counters) is a
single torch file of tensors and plain values, read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from visiontune.errors import UserError, first_line
from visiontune.io import atomic_write

METADATA_KEY = "visiontune"
def save_model(path: Path, model: nn.Module, metadata: dict) -> None:
    header = {METADATA_KEY: json.dumps(metadata)}
    atomic_write(path, lambda tmp: safetensors.torch.save_model(model, tmp, metadata=header))


def load_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    return safetensors.torch.load_file(str(path)), metadata


def save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    """The resume state; a damaged or foreign file is one UserError, never unpickled."""
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes on a foreign file: noise here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} was refused: it is damaged or holds pickled objects other than tensors and plain "
            "values, which could run code, so it is not a file visiontune wrote. Restore it, or start the "
            "run again with another --out"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"{path} is damaged or truncated ({first_line(exc, 200)}); restore it, or start the run again") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is damaged: not a visiontune resume state")
    return state
