"""`--shard`, `--files` and `visiontune merge-shards`: the options predict, features and anomaly
predict share for huge or distributed runs (see `visiontune.data.shards`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

stdout = Console(highlight=False, soft_wrap=True)
Opt = typer.Option

ShardSpec = Annotated[str | None, Opt(
    "--shard", help="Run only shard K of N (1-based, e.g. 2/4), written to OUT.part-K-of-N; default under "
                    "torchrun / srun: RANK+1 of WORLD_SIZE (SLURM_PROCID / SLURM_NTASKS). Join with merge-shards.")]
FilesList = Annotated[Path | None, Opt(
    "--files", help="A text file listing the images, one path a line (instead of image arguments).")]


def resolve(spec: str | None):
    """The shard of this process (`--shard`, else the launcher's environment), or None."""
    from visiontune.data.shards import resolve_shard

    return resolve_shard(spec)


def inputs(paths: list | None, files: Path | None):
    """The command's images: its arguments (files and folders) or the `--files` list."""
    from visiontune.data.paths import image_inputs

    return image_inputs(paths, files)


def print_part(shard, part: Path, complete: bool, out: Path) -> None:
    state = "was already complete (marker matches); not run again" if complete else "written"
    stdout.print(f"shard {shard}: {part} {state}; once all shards are done: visiontune merge-shards {out}",
                 markup=False)


def merge_shards(
    out: Annotated[Path, typer.Argument(help="The --out the shards were run with (.csv, .jsonl, .npz, .safetensors).")],
) -> None:
    """Join the finished parts OUT.part-K-of-N of a sharded predict / features / anomaly predict into OUT."""
    from visiontune.data.shards import merge_csv_shards
    from visiontune.errors import UserError

    if out.suffix.lower() in (".npz", ".safetensors"):
        from visiontune.features.store import merge_feature_shards

        merged = merge_feature_shards(out)
    elif out.suffix.lower() in (".csv", ".jsonl"):
        merged = merge_csv_shards(out)
    else:
        raise UserError(f"merge-shards takes a .csv, .jsonl, .npz or .safetensors output, not {out.name!r}")
    stdout.print(f"{merged['parts']} part(s), {merged['rows']} row(s) merged into {out}", markup=False)


def register(app: typer.Typer) -> None:
    app.command(name="merge-shards")(merge_shards)
