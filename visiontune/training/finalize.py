"""The end of a run: the best model evaluated on every split, summary.json, the plot, the OOD
scorers, the report.

The run's numbers are those of the best-on-validation checkpoint (the linear probe when no
fine-tuned epoch beat it), read back from its file. The resume state is marked finished only once
summary.json is written, so a run stopped while finishing can still be resumed. Under DDP every
process evaluates its share; rank 0 alone writes, and fits the OOD scorers and the report.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from visiontune.io import write_text_atomic
from visiontune.ood.fit import fit_ood
from visiontune.run import Run
from visiontune.runformat import STATE_FILE, SUMMARY_FILE
from visiontune.training.checkpoint import load_state, save_model, save_state
from visiontune.training.history import plot_history
from visiontune.training.loop import EpochResult, evaluate
from visiontune.training.setup import TrainingSetup
from visiontune.training.trainer import TrainingOutcome

log = logging.getLogger(__name__)


def finalize(setup: TrainingSetup, run_dir: Path, outcome: TrainingOutcome, started: float) -> Run:
    """Evaluate the best model, write summary.json, history.png and (with --report) the report.

    `started` is when this process began the run: the summary's wall time counts from it.
    """
    cfg, history, timings, fabric = setup.cfg, outcome.history, outcome.timings, setup.fabric
    if outcome.best_epoch is None and fabric.is_global_zero:  # the monitor was never finite (e.g. NaN losses)
        log.warning("%s was never finite; keeping the last epoch as best", cfg.monitor)
        save_model(run_dir / "checkpoints/best.safetensors", setup.model, setup.metadata)
    if fabric.world_size > 1:
        fabric.barrier()  # rank 0 has written best.safetensors
    best = Run(run_dir).load_model("best")
    setup.model.load_state_dict(best.state_dict())
    t0 = time.perf_counter()
    results = {
        split: _result_dict(evaluate(setup.fabric, setup.module, loader, setup.eval_loss_fn, len(setup.labels)))
        for split, loader in setup.eval_loaders.items()
    }
    timings["final_eval_s"] = time.perf_counter() - t0
    timings["train_s"] = sum(timings["epochs_s"])
    timings["wall_s"] = time.perf_counter() - started  # this process only, when resumed
    probe = next((record for record in history if record["stage"] == "probe"), None)
    readable = setup.scanned.readable
    summary = {
        "best_epoch": outcome.best_epoch,
        # epoch 0 is the linear probe: no fine-tuned epoch beat it on validation
        "kept": "probe" if outcome.best_epoch == 0 else "fine-tuned",
        "probe": None if probe is None else {
            "val_accuracy": probe["val_accuracy"], "val_f1_macro": probe["val_f1_macro"],
            "val_loss": probe["val_loss"], **outcome.probe_choice,
        },
        "monitor": cfg.monitor,
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        **results,
        "labels": setup.labels,
        "counts": {
            split: {label: sum(1 for s in readable if s.split == split and s.label == label) for label in setup.labels}
            for split in ("train", "val", "test")
        },
        "timings": timings,
        "skipped": [{"path": s.path, "reason": s.reason} for s in setup.scanned.skipped],
        "empty_classes": setup.empty_classes,
        "curation": setup.curation,
        "data_checks": {
            "errors": setup.data_checks.errors,
            "warnings": setup.data_checks.warnings,
            "cross_split_duplicates": setup.data_checks.cross_split_duplicates,
        },
        "device": str(fabric.device),
        "processes": fabric.world_size,
    }
    if not fabric.is_global_zero:
        return Run(run_dir)
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    plot_history(history, run_dir / "history.png", cfg.freeze_epochs)
    final = load_state(run_dir / STATE_FILE)
    save_state(run_dir / STATE_FILE, {**final, "finished": True})
    setup.console.print(_summary_line(summary, run_dir))
    run = Run(run_dir)
    _fit_ood(run, setup, best)
    if cfg.report:
        _write_report(run, setup, run_dir)
    return run


def _fit_ood(run: Run, setup: TrainingSetup, best) -> None:
    """The OOD scorers every prediction is flagged with; a failure is a warning, the run stands."""
    try:
        fit_ood(run, model=best, device=setup.cfg.device, workers=setup.workers)
    except Exception as exc:  # the trained run is complete; a failed extra must not hide it
        log.warning("the run finished, but fitting its OOD scores failed (%s: %s); retry with "
                    "visiontune ood fit %s", type(exc).__name__, exc, run.dir)


def _write_report(run: Run, setup: TrainingSetup, run_dir: Path) -> None:
    """The evaluation report of the test split (val without one); a failure is a warning, the run stands."""
    split = "test" if "test" in setup.eval_loaders else "val"
    try:
        run.evaluate(split, device=setup.cfg.device, workers=setup.workers)
    except Exception as exc:  # the trained run is complete; a failed extra must not hide it
        log.warning("the run finished, but its evaluation report failed (%s: %s); retry with "
                    "visiontune evaluate %s", type(exc).__name__, exc, run_dir)
    else:
        setup.console.print(f"report: {run_dir / 'report.html'}")


def _result_dict(result: EpochResult) -> dict:
    return {"accuracy": result.accuracy, "f1_macro": result.f1_macro, "loss": result.loss}


def _summary_line(summary: dict, run_dir: Path) -> str:
    if summary["kept"] == "probe":
        parts = [f"kept the linear probe (epoch 0): no fine-tuned epoch beat its validation {summary['monitor']}"]
    else:
        parts = [f"best epoch {summary['best_epoch']}"]
        if summary["probe"]:
            parts.append(f"linear probe val accuracy {summary['probe']['val_accuracy']:.3f}")
    for split in ("val", "test"):
        if split in summary:
            parts.append(f"{split} accuracy {summary[split]['accuracy']:.3f} macro-F1 {summary[split]['f1_macro']:.3f}")
    if summary["skipped"]:
        parts.append(f"{len(summary['skipped'])} file(s) skipped (listed in summary.json)")
    return "; ".join(parts) + f"\nrun saved to {run_dir}"
