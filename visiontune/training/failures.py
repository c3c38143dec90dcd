"""A run that stops mid-way ends with one line saying why and how to continue, not a traceback.

Whatever stops an epoch (a transform that raises in a DataLoader worker, a full disk, a bug), the
last completed epoch is already saved atomically, so the run can always be resumed; the full
traceback goes to RUN/error.log for whoever needs it.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visiontune.errors import UserError
from visiontune.io import DiskFullError, write_text_atomic

ERROR_LOG = "error.log"


class RunStoppedError(UserError):
    """Training stopped before the end; the message names the cause and the way to continue."""


_PASS = "_visiontune_pass_through"


@contextmanager
def passed_through() -> Iterator[None]:
    """Exceptions raised in this block reach the caller as they are (callbacks, e.g. optuna's pruning)."""
    try:
        yield
    except Exception as exc:
        setattr(exc, _PASS, True)
        raise


def stopped_run_error(exc: BaseException, run_dir: Path, state_file: str) -> UserError | None:
    """The one-line error to raise for `exc`, which stopped the run in `run_dir`; None: raise `exc`."""
    if getattr(exc, _PASS, False):
        return None
    if (run_dir / state_file).is_file():
        how = f"the last completed epoch is saved; continue with: visiontune train --resume {run_dir}"
    else:
        how = f"no epoch had completed; start it again with the same --out {run_dir}"
    if isinstance(exc, DiskFullError):
        return RunStoppedError(f"{exc}. Free some space: {how}")
    if isinstance(exc, UserError):
        return None
    logged = _write_log(exc, run_dir)
    return RunStoppedError(f"training stopped: {summary(exc)}. {how[0].upper()}{how[1:]}{logged}")


def summary(exc: BaseException) -> str:
    """`Type: message` on one line; for an error re-raised from a DataLoader worker, the worker's
    own last line (the first line is only "Caught X in DataLoader worker process N")."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "worker process" in lines[0]:
        last = lines[-1].strip()
        match = re.match(r"([\w.]+): (.*)", last)
        return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}" if match else last
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _write_log(exc: BaseException, run_dir: Path) -> str:
    try:
        write_text_atomic(run_dir / ERROR_LOG, "".join(traceback.format_exception(exc)))
    except Exception:  # the disk may be what failed; the message itself is what matters
        return ""
    return f" (traceback in {run_dir / ERROR_LOG})"
