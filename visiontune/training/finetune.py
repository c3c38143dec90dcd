"""`fit`: the staged fine-tuning recipe, frozen backbone first, then everything with discriminative lrs.

A run is set up (setup.py: data, run files, model, loaders, optimizer), trained (trainer.py: the
probe, the frozen and unfrozen stages, a resume state per epoch) and finalized (finalize.py:
summary.json, the best model's numbers, the report). `resume=RUN_DIR` rebuilds the setup from the
run directory and continues from its resume state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from visiontune.config import TrainConfig, config_for
from visiontune.locking import locked_dir
from visiontune.run import Run
from visiontune.runformat import STATE_FILE
from visiontune.training.failures import stopped_run_error
from visiontune.training.finalize import finalize
from visiontune.training.lr_find import resolve_auto_lr
from visiontune.training.setup import build_setup, new_run_dir, run_dir_for
from visiontune.training.trainer import Callback, Trainer, load_resume


def fit(
    data: str | os.PathLike | None = None,
    *,
    config: TrainConfig | None = None,
    resume: str | os.PathLike | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    **options: Any,
) -> Run:
    """Fine-tune a timm backbone on `data`; options are TrainConfig fields (the CLI flags).

    `resume=RUN_DIR` continues an interrupted run from its last completed epoch.
    """
    if resume is not None:
        with locked_dir(resume, create=False):  # one process per run directory (locking.py)
            run_dir = Path(resume)
            cfg, state = load_resume(run_dir)
            return _run(cfg, run_dir, _console(progress), callbacks, progress, state)
    cfg = config_for(data, config, options)
    with locked_dir(run_dir_for(cfg)):
        run_dir = new_run_dir(cfg)
        console = _console(progress)
        if cfg.lr == "auto":  # replaced by the number found, so config.yaml (and any resume) has it
            resolve_auto_lr(cfg, run_dir, console)
        return _run(cfg, run_dir, console, callbacks, progress)


def _console(progress: bool) -> Console:
    return Console(quiet=not progress, highlight=False, soft_wrap=True)


def _run(
    cfg: TrainConfig, run_dir: Path, console: Console, callbacks: Sequence[Callback], progress: bool,
    state: dict | None = None,
) -> Run:
    """Set up, train and finalize; a run that stops mid-way ends with one line saying how to continue."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = build_setup(cfg, console, run_dir, resuming=state is not None)
    trainer = Trainer(setup, run_dir, callbacks, progress, state)
    try:
        return finalize(setup, run_dir, trainer.train(), started)
    except KeyboardInterrupt:
        console.print(f"interrupted; continue with: visiontune train --resume {run_dir}")
        raise
    except Exception as exc:  # a worker, a transform, a full disk: one line and the way on
        error = stopped_run_error(exc, run_dir, STATE_FILE)
        if error is None:
            raise
        raise error from exc
