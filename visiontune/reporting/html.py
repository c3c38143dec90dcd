"""The one HTML writer of visiontune: every report is a template in reporting/templates that
extends base.html, rendered with autoescaping on (file names and labels are user input) and
StrictUndefined (a misspelt field fails loudly instead of printing nothing), then written
atomically, so a reader never opens half a page."""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path

import jinja2

from visiontune._version import __version__
from visiontune.io import write_text_atomic
from visiontune.reporting import formatting
from visiontune.reporting.images import data_uri

FILTERS = {
    "fixed": formatting.fixed,
    "sig": formatting.significant,
    "percent": formatting.percent,
    "ci": formatting.interval,
    "cell": formatting.cell,
    "data_uri": data_uri,
}


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("visiontune.reporting", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(FILTERS)
    return env


def render(template: str, **context: object) -> str:
    """`template` as HTML; base.html's `version` and `generated` are filled in unless given."""
    defaults = {"version": __version__, "generated": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    return environment().get_template(template).render(**(defaults | context))


def render_page(template: str, path: str | Path, **context: object) -> Path:
    """Render `template` into `path`, replacing any old page only once the new one is complete."""
    path = Path(path)
    write_text_atomic(path, render(template, **context))
    return path
