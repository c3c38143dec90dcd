"""Feature files: written row by row into memory-mapped temporaries, then one atomic rename.

Memory stays bounded by one batch however many images there are: rows go straight to an
`np.memmap` next to the output, and the final file is copied from it in chunks. The format
follows the `--out` suffix: `.npz` (numpy) or `.safetensors` (paths, classes and splits in its
string metadata). `load_features` reads either back; `merge_feature_shards` joins the parts of a
sharded `visiontune features` run into the file an unsharded run writes.
"""

from __future__ import annotations

import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import safetensors.numpy

from visiontune.data.shards import finished_parts
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


def merge_feature_shards(out: str | Path) -> dict:
    """Join the finished parts of `out` (one per shard, in shard order) into `out`, one part in
    memory at a time: the rows, paths, labels and splits of an unsharded run, its skipped files."""
    out = check_out_path(out)
    parts = [(part, info) for part, info in finished_parts(out) if part.stat().st_size]  # empty: no inputs
    if not parts:
        raise UserError(f"the shards of {out} hold no images")
    folder, rows = temporary_rows(out, sum(info["inputs"] for _, info in parts))
    paths, labels, splits, skipped, meta, classes = [], [], [], [], None, None
    with folder:
        for part, _ in parts:
            loaded = load_features(part)
            paths += loaded.pop("paths")
            splits += loaded.pop("splits")
            labels.append(loaded.pop("labels"))
            part_meta, part_classes = loaded.pop("meta"), loaded.pop("classes")
            if meta is not None and (part_classes != classes or _setup(part_meta) != _setup(meta)):
                raise UserError(f"{part} was extracted with other settings than the first part; run it again")
            meta, classes = meta or part_meta, part_classes
            skipped += part_meta.get("skipped", [])
            rows.append(loaded)
        save_features(out, rows.filled(), paths, np.concatenate(labels), classes, splits, {**meta, "skipped": skipped})
    return {"out": str(out), "parts": len(parts), "rows": len(paths), "skipped": len(skipped)}


def _setup(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "skipped"}
