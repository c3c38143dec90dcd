"""The images a command was given: files as named, folders searched.

Every command that takes images (predict, explain, features, anomaly predict) expands its inputs
here, so a folder, a file and a missing path mean the same thing everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from visiontune.data.sources import list_image_files
from visiontune.errors import UserError


def expand_image_paths(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders searched recursively for image files (hidden ones skipped)."""
    found: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [str(p) for p in list_image_files(path)]
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserError(f"no such file or folder: {path}")
    if not found:
        raise UserError("no image files found in " + ", ".join(map(str, inputs)))
    return found
