"""Errors that are the user's to fix: the CLI prints their message, without a traceback."""


class UserError(Exception):
    """A mistake in the input (paths, data, options, weights) explained in one message."""


class WeightsUnavailableError(UserError):
    """Pretrained weights were asked for but cannot be had here."""


class UnsafeWeightsError(UserError):
    """A weights file holds pickled objects other than tensors and was refused."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when empty), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def require_some_read(done: int, skipped: int, verb: str) -> None:
    """The rule of every command that takes images (predict, explain, anomaly predict): a missing
    path or no image file at all is an error up front (`expand_image_paths`); unreadable files are
    listed, not fatal; but a command that could read none of them failed, and says so (exit 2)."""
    if done == 0:
        raise UserError(f"none of the {skipped} image file(s) could be read, so nothing was {verb}")
