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
