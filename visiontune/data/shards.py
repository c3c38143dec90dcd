"""Sharded runs of predict, features and anomaly predict: one part per shard, resumable, merged.

`--shard K/N` is 1-based (K from 1 to N); under torchrun or srun the shard comes from the
environment (`RANK`/`WORLD_SIZE`, `SLURM_PROCID`/`SLURM_NTASKS`, both 0-based ranks). Shard K
takes the K-th of N contiguous ranges of the expanded input list (folders sorted, `--files`
lists in their order), so the merged parts are the unsharded output row for row.

Each shard writes `OUT.part-K-of-N.<suffix>` atomically, then a marker beside it
(`...part-K-of-N.<suffix>.done.json`: input count, a hash of its inputs and of the whole list,
the part's size and hash). A re-run skips a shard whose marker matches its inputs and its part;
anything else (no marker, other inputs, a damaged part) is recomputed. `merge_parts` joins text
parts (CSV, JSON lines); the features store joins its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from visiontune.errors import UserError
from visiontune.io import atomic_write, read_json, write_text_atomic

ENV_RANKS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))  # 0-based rank, count
MARKER_SUFFIX = ".done.json"
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this shard's contiguous range of `total` inputs."""
        return (self.index - 1) * total // self.count, self.index * total // self.count

    def take(self, items: Sequence) -> Sequence:
        start, stop = self.bounds(len(items))
        return items[start:stop]

    def part_path(self, out: Path) -> Path:
        return out.with_name(f"{out.stem}.part-{self.index}-of-{self.count}{out.suffix}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str) -> Shard:
    """'K/N' (1-based) or a UserError saying what is wrong."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not match:
        raise UserError(f"--shard must be K/N with 1 <= K <= N (1-based, e.g. 1/4), not {spec!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UserError(f"--shard {spec}: K must be between 1 and N={count} (shards are numbered from 1)")
    return Shard(index, count)


def resolve_shard(spec: str | None, environ: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard asked for, else the one of a distributed launch (world size above 1), else None."""
    if spec is not None:
        return parse_shard(spec)
    for rank_name, size_name in ENV_RANKS:
        if rank_name in environ and size_name in environ:
            try:
                rank, size = int(environ[rank_name]), int(environ[size_name])
            except ValueError:
                raise UserError(f"{rank_name}={environ[rank_name]!r} / {size_name}={environ[size_name]!r} "
                                "are not whole numbers; pass --shard K/N") from None
            if size > 1:
                if not 0 <= rank < size:
                    raise UserError(f"{rank_name}={rank} is outside 0..{size - 1} ({size_name}={size})")
                return Shard(rank + 1, size)
    return None


def hash_paths(paths: Iterable) -> str:
    """sha256 of the paths, one a line, as the marker stores it."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(path) + b"\n")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def marker_path(part: Path) -> Path:
    return part.with_name(part.name + MARKER_SUFFIX)


@dataclass(frozen=True)
class ShardRun:
    shard: Shard
    part: Path
    inputs: int
    skipped_existing: bool  # True: the part was already complete, nothing was run


def run_shard(out: Path, paths: Sequence[str], shard: Shard, write_part: Callable[[Sequence[str], Path], None],
              extra_files: Callable[[Path], list[Path]] = lambda part: []) -> ShardRun:
    """Run `write_part(shard_paths, part_path)` unless the part is complete already, then mark it.
    A shard with no inputs (more shards than inputs) gets an empty part without calling it, so
    that the merge still finds every shard.

    `extra_files(part)` names files written beside the part (skipped lists) that the marker
    vouches for too; each must exist when the marker says it does.
    """
    part = shard.part_path(out)
    mine = shard.take(paths)
    expected = {"shard": shard.index, "of": shard.count, "inputs": len(mine), "inputs_sha256": hash_paths(mine),
                "all_inputs": len(paths), "all_inputs_sha256": hash_paths(paths)}
    if _complete(part, expected):
        return ShardRun(shard, part, len(mine), True)
    marker_path(part).unlink(missing_ok=True)
    for extra in extra_files(part):
        extra.unlink(missing_ok=True)  # a stale skipped list from an earlier attempt
    if len(mine):
        write_part(mine, part)
    else:
        atomic_write(part, lambda tmp: None)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in [part, *extra_files(part)] if p.exists()}
    write_text_atomic(marker_path(part), json.dumps({**expected, "files": files}, indent=1))
    return ShardRun(shard, part, len(mine), False)


def _complete(part: Path, expected: dict) -> bool:
    marker = marker_path(part)
    if not marker.is_file() or not part.is_file():
        return False
    try:
        found = read_json(marker)
    except UserError:
        return False
    return {k: found.get(k) for k in expected} == expected and _files_intact(part.parent, found.get("files", {}))


def _files_intact(folder: Path, files: dict) -> bool:
    for name, info in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"] or file_sha256(path) != info["sha256"]:
            return False
    return True


def finished_parts(out: Path) -> list[tuple[Path, dict]]:
    """(part, its marker) of `out`, in shard order, once every shard of one run has finished;
    else a UserError naming the shards still missing."""
    pattern = re.compile(re.escape(out.stem) + r"\.part-(\d+)-of-(\d+)" + re.escape(out.suffix) + re.escape(MARKER_SUFFIX))
    markers = {}
    for marker in out.parent.glob(f"{out.stem}.part-*-of-*{out.suffix}{MARKER_SUFFIX}"):
        if match := pattern.fullmatch(marker.name):
            markers[(int(match.group(1)), int(match.group(2)))] = marker
    counts = {count for _, count in markers}
    if not counts:
        raise UserError(f"no finished shards of {out} (looked for {out.stem}.part-K-of-N{out.suffix}{MARKER_SUFFIX})")
    if len(counts) > 1:
        raise UserError(f"{out} has finished shards of runs split {sorted(counts)} ways; remove the parts of the old run")
    count = counts.pop()
    missing = [str(k) for k in range(1, count + 1) if (k, count) not in markers]
    if missing:
        raise UserError(f"shard(s) {', '.join(missing)} of {count} of {out} have not finished; run them first")
    parts, whole = [], set()
    for k in range(1, count + 1):
        info = read_json(markers[(k, count)])
        part = Shard(k, count).part_path(out)
        if not part.is_file() or not _files_intact(out.parent, info.get("files", {})):
            raise UserError(f"{part} is missing or changed since its shard finished; run shard {k}/{count} again")
        whole.add(info.get("all_inputs_sha256"))
        parts.append((part, info))
    if len(whole) > 1:
        raise UserError(f"the shards of {out} were run on different input lists; run them again on one list")
    return parts


def merge_text_parts(parts: Sequence[Path], out: Path, header: bool) -> int:
    """Concatenate text parts into `out` atomically (a CSV's header once, from the first part
    that has one); returns the number of data lines."""
    lines = 0

    def write(tmp: str) -> None:
        nonlocal lines
        written_header = False
        with open(tmp, "wb") as target:
            for part in parts:
                with open(part, "rb") as source:
                    first = source.readline() if header else b""
                    if first and not written_header:
                        target.write(first)
                        written_header = True
                    for line in source:
                        target.write(line)
                        lines += 1

    atomic_write(out, write)
    return lines


def merge_csv_shards(out: Path, companions: Sequence[str] = (".skipped.csv",)) -> dict:
    """Join finished CSV / JSON lines parts of `out` into `out` (and each companion file, e.g.
    the parts' `.skipped.csv` lists, into `out`'s), row for row as an unsharded run writes them."""
    parts = [part for part, _ in finished_parts(out)]
    rows = merge_text_parts(parts, out, header=out.suffix == ".csv")
    merged = {"out": str(out), "parts": len(parts), "rows": rows}
    for companion in companions:
        found = [p.with_name(p.stem + companion) for p in parts if p.with_name(p.stem + companion).is_file()]
        target = out.with_name(out.stem + companion)
        if found:
            merged[companion] = merge_text_parts(found, target, header=True)
        else:
            target.unlink(missing_ok=True)
    return merged
