"""Atomic checkpoint files: a reader sees the old file or the new one, never half of one.

Model weights are safetensors with the run's metadata (labels, preprocessing, backbone, config) in
their header, so one file is a complete model. The resume state (model, optimizer, counters) is a
single torch file of tensors and plain values, read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

METADATA_KEY = "visiontune"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result over `path` only once it is complete and synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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
    return torch.load(path, map_location="cpu", weights_only=True)
