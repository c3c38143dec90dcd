"""Errors that are the user's to fix: the CLI prints their message, without a traceback."""


class UserError(Exception):
    """A mistake in the input (paths, data, options, weights) explained in one message."""


class WeightsUnavailableError(UserError):
    """Pretrained weights were asked for but cannot be had here."""


class UnsafeWeightsError(UserError):
    """A weights file holds pickled objects other than tensors and was refused."""
