"""The images a command was given: files as named, folders searched, or a list file.

Every command that takes images (predict, explain, features, anomaly predict) expands its inputs
here, so a folder, a file and a missing path mean the same thing everywhere. A `--files` list
(one path a line, millions of lines) is held as one bytes buffer and two offset arrays
(`PathList`), not a Python string per file; its paths are not checked up front: a missing file
is a skipped row with its reason, as any unreadable image is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visiontune.data.sources import list_image_files
from visiontune.errors import UserError


class PathList(Sequence):
    """The lines of a list file as a read-only sequence of str; slices are PathLists too."""

    def __init__(self, data: bytes, starts: np.ndarray, stops: np.ndarray, source: str = "") -> None:
        self._data, self._starts, self._stops, self.source = data, starts, stops, source

    @classmethod
    def read(cls, file: str | os.PathLike) -> PathList:
        """Non-blank lines of `file` (UTF-8 or the file system's encoding; CRLF or LF), in order."""
        path = Path(file).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read the file list {path}: {exc.strerror or exc}") from None
        buffer = np.frombuffer(data, dtype=np.uint8)
        newlines = np.flatnonzero(buffer == ord("\n"))
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        stops = np.concatenate([newlines, [len(data)]]).astype(np.int64)
        carriage = (stops > starts) & (buffer[np.maximum(stops - 1, 0)] == ord("\r")) if len(data) else stops > starts
        stops = stops - carriage
        keep = stops > starts
        listed = cls(data, starts[keep], stops[keep], str(path))
        if not len(listed):
            raise UserError(f"the file list {path} names no files")
        return listed

    @classmethod
    def of(cls, paths: Sequence[str]) -> PathList:
        """`paths` packed into one buffer (a PathList as it is)."""
        if isinstance(paths, PathList):
            return paths
        encoded = [os.fsencode(p) for p in paths]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        stops = np.cumsum(lengths)
        return cls(b"".join(encoded), stops - lengths, stops)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PathList(self._data, self._starts[index], self._stops[index], self.source)
        return os.fsdecode(self._data[self._starts[index]:self._stops[index]])

    def __iter__(self):
        data = self._data
        for start, stop in zip(self._starts.tolist(), self._stops.tolist()):
            yield os.fsdecode(data[start:stop])


def image_inputs(inputs: Sequence[str | os.PathLike] | None, files: str | os.PathLike | None) -> Sequence[str]:
    """The images of a command: its paths (files and folders) or a `--files` list, not both."""
    if files is not None:
        if inputs:
            raise UserError("pass image paths or --files LIST, not both")
        return PathList.read(files)
    if not inputs:
        raise UserError("no images given: pass image files or folders, or --files LIST (one path a line)")
    return expand_image_paths(inputs)


def expand_image_paths(inputs: Sequence[str | os.PathLike]) -> Sequence[str]:
    """Files as given, folders searched recursively for image files (hidden ones skipped);
    a PathList (`image_inputs` of a `--files` list) is already expanded and passes through."""
    if isinstance(inputs, PathList):
        return inputs
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
