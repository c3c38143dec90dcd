"""Atomic checkpoint files: a reader sees the old file or the new one, never half of one.

Model weights are safetensors with the run's metadata (labels, preprocessing, backbone, config) in
their header, so one file is a complete model. The resume state (model, optimizer, counters) is a
single torch file of tensors and plain values, read back with `weights_only=True`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from visiontune.errors import UserError, first_line

METADATA_KEY = "visiontune"
FULL_BELOW_BYTES = 1 << 20  # a write that failed with less than this free failed for space


class DiskFullError(UserError):
    """A file could not be written for lack of space; the file it would replace is untouched."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result over `path` only once it is complete and synced.

    A full disk raises DiskFullError (one line naming the file and the disk) whatever the writer
    raised: safetensors and torch.save report it in their own words ("unexpected pos").
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and not isinstance(exc, UserError) and _disk_full(exc, path.parent)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                f"cannot write {path}: no space left on the disk holding {path.parent} "
                f"({_free_bytes(path.parent) / 2**20:.1f} MiB free now)"
            ) from None
        raise


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain, or (writers that hide the errno) a full disk now,
    measured before the partial temporary file is deleted."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return _free_bytes(folder) < FULL_BELOW_BYTES
    except OSError:
        return False


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


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
