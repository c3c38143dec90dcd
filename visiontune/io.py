"""Files written whole or not at all, and JSON read back with one clear message when damaged.

Every artifact visiontune writes (run directories, anomaly models, feature stores, reports) goes
through `atomic_write`: a reader sees the old file or the new one, never half of one, and a full
disk is one message naming the file instead of a writer's own words.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from visiontune.errors import UserError

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
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_csv_atomic(path: Path, fieldnames: list[str], rows: list[dict] | list[list]) -> None:
    """A CSV with a header row; rows are dicts keyed by `fieldnames` or plain lists."""
    text = io.StringIO()
    if rows and isinstance(rows[0], dict):
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
    else:
        writer = csv.writer(text)
        writer.writerow(fieldnames)
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue(), encoding="utf-8", newline=""))


def read_json(path: Path) -> dict:
    """A JSON object from a run file, or one UserError naming the file and what is wrong."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is damaged (truncated or edited?): invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged: expected a JSON object")
    return value
