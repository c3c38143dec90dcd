"""Commands that take every `visiontune train` option, parsed by `train`'s own definitions.

`compare` and `lr-find` train (briefly or fully) with the same recipe as `train`, so they accept
the same options and data argument. Rather than repeating forty declarations, such a command lets
click pass the arguments it does not know through, and they are parsed here by the `train`
command itself: one definition, the same names, types, checks and error messages.
"""

from __future__ import annotations

from typing import Any

import typer

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError

FORWARDING = {"allow_extra_args": True, "ignore_unknown_options": True}
TRAIN_OPTIONS_HELP = "Also takes DATA and every option of `visiontune train` (see visiontune train --help)."


def parse_train_options(ctx: typer.Context) -> TrainConfig:
    """The TrainConfig that `visiontune train` would build from this command's extra arguments."""
    group = ctx.parent
    train = group.command.get_command(group, "train")
    parsed = train.make_context(ctx.info_name, list(ctx.args), parent=group)
    given: dict[str, Any] = {k: v for k, v in parsed.params.items() if v is not None}
    config, resume = given.pop("config", None), given.pop("resume", None)
    if resume is not None:
        raise UserError(f"--resume belongs to `visiontune train`, not `{ctx.info_name}`")
    return TrainConfig.from_yaml(config, **given) if config else build_config(given)
