"""Split once, then train or reuse: the two steps every multi-run command (compare, tune) shares.

The data is split once into OUT/splits.csv and every run reads that file, so each run sees the
same images; a run directory that already holds a finished run is reused, an unfinished one is
resumed, and only a missing one is trained, so an interrupted command picks up where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path

from rich.console import Console

from visiontune.config import TrainConfig
from visiontune.data.samples import Sample
from visiontune.data.sources import discover
from visiontune.data.splits import write_splits_csv
from visiontune.errors import UserError
from visiontune.run import Run
from visiontune.runformat import CONFIG_FILE, SPLITS_FILE, STATE_FILE
from visiontune.training.checkpoint import load_state
from visiontune.training.finetune import fit

log = logging.getLogger(__name__)


def split_once(cfg: TrainConfig, out_dir: Path,
               check: Callable[[list[Sample]], None] | None = None) -> tuple[Path, list[Sample], bool]:
    """(OUT/splits.csv, its samples, whether it was reused): made from `cfg`'s data the first time.

    `check` sees a new split before it is written, so a split it refuses is never reused later.
    """
    path = out_dir / SPLITS_FILE
    if path.is_file():
        samples = discover(path).samples
        if check is not None:
            check(samples)
        return path, samples, True
    found = discover(cfg.data, cfg.label_regex, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    for note in found.notes:
        log.warning(note)
    if check is not None:
        check(found.samples)
    write_splits_csv(found.samples, path)
    return path, found.samples, False


def train_or_reuse(config: TrainConfig, run_dir: Path, progress: bool, console: Console,
                   same_except: Collection[str] | None = None) -> Run:
    """The finished run in `run_dir`, the unfinished one resumed, or a new one trained from `config`.

    With `same_except`, a run trained with other options than `config` (fields in `same_except`
    apart) is refused rather than reused.
    """
    state = run_dir / STATE_FILE
    if not state.is_file():
        return fit(config=config, out=str(run_dir), progress=progress)
    if same_except is not None:
        done = TrainConfig.from_yaml(run_dir / CONFIG_FILE)
        changed = [k for k in TrainConfig.model_fields if k not in same_except and getattr(done, k) != getattr(config, k)]
        if changed:
            detail = ", ".join(f"{k}: {getattr(done, k)!r} there, {getattr(config, k)!r} now" for k in changed[:3])
            raise UserError(f"{run_dir} was trained with other options ({detail}); choose another --out")
    if load_state(state).get("finished"):
        console.print(f"already trained; reusing {run_dir}")
        return Run(run_dir)
    return fit(resume=run_dir, progress=progress)
