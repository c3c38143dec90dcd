"""`fit`: the staged fine-tuning recipe, frozen backbone first, then everything with discriminative lrs.

A run is set up (setup.py: data, run files, model, loaders, optimizer), trained (trainer.py: the
probe, the frozen and unfrozen stages, a resume state per epoch) and finalized (finalize.py:
summary.json, the best model's numbers, the report). `resume=RUN_DIR` rebuilds the setup from the
run directory and continues from its resume state.

With `devices` / `num_nodes` above 1 the run is DDP (distributed.py): Fabric is launched first,
starting this node's other processes (which run the same command again) unless torchrun,
`fabric run` or SLURM started them, and rank 0 alone locks and writes the run directory, whose
name every rank takes from it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric
from rich.console import Console

from visiontune.config import LAUNCH_OPTIONS, TrainConfig, build_config, config_for
from visiontune.errors import UserError
from visiontune.locking import locked_dir
from visiontune.run import Run
from visiontune.runformat import STATE_FILE
from visiontune.training.distributed import on_rank_zero, per_process_batch
from visiontune.training.failures import stopped_run_error
from visiontune.training.finalize import finalize
from visiontune.training.lr_find import resolve_auto_lr
from visiontune.training.setup import build_setup, make_fabric, new_run_dir, run_dir_for
from visiontune.training.trainer import Callback, Trainer, load_resume, load_run_config


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

    `resume=RUN_DIR` continues an interrupted run from its last completed epoch; only the launch
    options (devices, num_nodes, strategy) may change then.
    """
    if resume is not None:
        run_dir = Path(resume)
        fabric = _launch(_relaunched(load_run_config(run_dir), options))
        with _locked(fabric, run_dir, create=False):  # one process per run directory (locking.py)
            cfg, state = load_resume(run_dir)  # again: what the lock now guarantees no one else writes
            cfg = _relaunched(cfg, options)
            return _run(cfg, run_dir, fabric, callbacks, progress, state)
    cfg = config_for(data, config, options)
    fabric = _launch(cfg)
    cfg.out = on_rank_zero(fabric, lambda: str(run_dir_for(cfg)))  # a generated name is rank 0's
    with _locked(fabric, cfg.out):
        run_dir = Path(on_rank_zero(fabric, lambda: str(new_run_dir(cfg))))
        cfg.out = str(run_dir)
        if cfg.lr == "auto":  # replaced by the number found, so config.yaml (and any resume) has it
            resolve_auto_lr(cfg, run_dir, _console(progress))
        return _run(cfg, run_dir, fabric, callbacks, progress)


def _relaunched(cfg: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    other = sorted(set(options) - set(LAUNCH_OPTIONS))
    if other:
        raise UserError(f"a resumed run keeps its config.yaml; only {', '.join(LAUNCH_OPTIONS)} may change (got {', '.join(other)})")
    return build_config({**cfg.model_dump(), **options}) if options else cfg


def _launch(cfg: TrainConfig) -> Fabric:
    """The run's Fabric, launched; several processes log warnings from rank 0 only."""
    fabric = make_fabric(cfg.device, cfg.devices, cfg.num_nodes, cfg.strategy)
    if cfg.lr == "auto" and fabric.world_size > 1:
        raise UserError("--lr auto runs in one process: run `visiontune lr-find` first and pass its --lr")
    per_process_batch(cfg.batch_size, fabric.world_size)  # refused here, before any process is started
    fabric.launch()
    if not fabric.is_global_zero:
        logging.getLogger("visiontune").setLevel(logging.ERROR)
    return fabric


@contextmanager
def _locked(fabric: Fabric, directory: str | os.PathLike, create: bool = True) -> Iterator[None]:
    """The directory's lock, held by rank 0 (the only writer) for the whole block."""
    with ExitStack() as stack:
        on_rank_zero(fabric, lambda: stack.enter_context(locked_dir(directory, create)) and None)
        yield


def _console(progress: bool) -> Console:
    return Console(quiet=not progress, highlight=False, soft_wrap=True)


def _run(
    cfg: TrainConfig, run_dir: Path, fabric: Fabric, callbacks: Sequence[Callback], progress: bool,
    state: dict | None = None,
) -> Run:
    """Set up, train and finalize; a run that stops mid-way ends with one line saying how to continue."""
    started = time.perf_counter()
    progress = progress and fabric.is_global_zero
    console = _console(progress)
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
    setup = build_setup(cfg, console, run_dir, resuming=state is not None, fabric=fabric)
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
