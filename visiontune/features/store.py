"""Feature files: written row by row into memory-mapped temporaries, then one atomic rename.

Memory stays bounded by one batch however many images there are: rows go straight to an
`np.memmap` next to the output, and the final file is copied from it in chunks. The format
follows the `--out` suffix: `.npz` (numpy) or `.safetensors` (paths, classes and splits in its
string metadata). `load_features` reads either back.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import safetensors.numpy

from visiontune.errors import UserError
from visiontune.io import atomic_write

SUFFIXES = (".npz", ".safetensors")
CHUNK_BYTES = 32 * 2**20
SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def check_out_path(out: str | Path) -> Path:
    path = Path(out).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--out must end in .npz or .safetensors, not {path.name!r}")
    return path


class RowArrays:
    """Preallocated memory-mapped arrays of up to `capacity` rows each, filled in order."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory, self.capacity, self.rows = directory, capacity, 0
        self.arrays: dict[str, np.memmap] = {}

    def append(self, batch: dict[str, np.ndarray]) -> None:
        count = len(next(iter(batch.values()))) if batch else 0
        for name, values in batch.items():
            if name not in self.arrays:
                self.arrays[name] = np.lib.format.open_memmap(
                    self.directory / f"{len(self.arrays)}.npy", mode="w+", dtype=values.dtype,
                    shape=(self.capacity, *values.shape[1:]))
            self.arrays[name][self.rows:self.rows + count] = values
        self.rows += count

    def filled(self) -> dict[str, np.ndarray]:
        """Views of the written rows (still on disk)."""
        return {name: array[:self.rows] for name, array in self.arrays.items()}


def temporary_rows(near: Path, capacity: int) -> tuple[tempfile.TemporaryDirectory, RowArrays]:
    """RowArrays in a temporary folder beside `near` (same disk, removed by the caller's cleanup)."""
    near.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.TemporaryDirectory(prefix=f".{near.name}.", dir=near.parent)
    return folder, RowArrays(Path(folder.name), capacity)


def save_features(out: Path, arrays: dict[str, np.ndarray], paths: list[str], labels: np.ndarray,
                  classes: list[str], splits: list[str], meta: dict) -> Path:
    """Write `arrays` (possibly memory-mapped) with paths, labels and splits, atomically."""
    out = check_out_path(out)
    arrays = {**arrays, "labels": np.asarray(labels, dtype=np.int64)}
    if out.suffix.lower() == ".npz":
        strings = {"paths": paths, "classes": classes, "splits": splits, "meta": [json.dumps(meta)]}
        atomic_write(out, lambda tmp: _write_npz(tmp, arrays, strings))
    else:
        text = {"paths": json.dumps(paths), "classes": json.dumps(classes), "splits": json.dumps(splits),
                "meta": json.dumps(meta)}
        atomic_write(out, lambda tmp: _write_safetensors(tmp, arrays, text))
    return out


def load_features(path: str | Path) -> dict:
    """{"features" or "features.<layer>": arrays, "labels", "paths", "classes", "splits", "meta"}."""
    path = check_out_path(path)
    if not path.is_file():
        raise UserError(f"no such feature file: {path}")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            loaded = {name: data[name] for name in data.files}
        strings = {k: loaded.pop(k).tolist() for k in ("paths", "classes", "splits", "meta")}
        return {**loaded, **strings, "meta": json.loads(strings["meta"][0])}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        text = handle.metadata()
    loaded = safetensors.numpy.load_file(str(path))
    return {**loaded, **{k: json.loads(text[k]) for k in ("paths", "classes", "splits", "meta")}}


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, CHUNK_BYTES // max(1, array[:1].nbytes))
    for start in range(0, len(array), rows):
        yield np.ascontiguousarray(array[start:start + rows])


def _write_npz(path: str, arrays: dict[str, np.ndarray], strings: dict[str, list[str]]) -> None:
    """Uncompressed; numpy copies each (memory-mapped) array into the zip member in buffered chunks."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays, **{name: np.asarray(values, dtype=str) for name, values in strings.items()})


def _write_safetensors(path: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), written
    chunk by chunk from memory-mapped arrays; `safetensors.numpy.save_file` would copy each whole
    array into memory first."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, array in arrays.items():
        if array.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"unsupported dtype {array.dtype} for {name}")
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in arrays.values():
            handle.writelines(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes() for chunk in _chunks(array))
