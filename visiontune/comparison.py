"""Compare backbones on one dataset: same recipe, same split, same held-out test images.

The split is made once and written to OUT/splits.csv; every model then trains on that CSV, so the
test images are the same for all. Test accuracy and macro-F1 come with 95% bootstrap intervals
from `Run.evaluate("test")`. Inference speed is measured here, on this machine: forward passes of
a batch of random images at each model's input size, after a warm-up, median over repeats, the
models interleaved so that a change in machine load touches all of them alike.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from visiontune.config import TrainConfig, build_config, config_for
from visiontune.data.samples import Sample
from visiontune.devices import plan_cpu, resolve_device
from visiontune.errors import UserError
from visiontune.inference.timing import time_call
from visiontune.io import atomic_write, write_text_atomic
from visiontune.locking import locked_dir
from visiontune.models.backbones import check_weights_available
from visiontune.run import Run
from visiontune.training.reuse import split_once, train_or_reuse

COLUMNS = (
    "model", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1_macro", "f1_macro_ci_low",
    "f1_macro_ci_high", "params", "train_s", "ms_per_image", "timing_batch", "test_images", "best_epoch", "run",
)
# options that differ between a comparison's runs by design, or do not change what is trained
PER_RUN_FIELDS = {"model", "out", "data", "workers", "threads", "report"}


@dataclass
class ComparisonResult:
    rows: list[dict]  # one per model, keys COLUMNS
    dir: Path
    machine: dict  # where and how inference was timed

    @property
    def csv(self) -> Path:
        return self.dir / "comparison.csv"

    @property
    def markdown(self) -> Path:
        return self.dir / "comparison.md"

    @property
    def plot(self) -> Path:
        return self.dir / "comparison.png"


def compare(
    data: str | os.PathLike | None = None,
    models: str | list[str] = ("resnet18", "resnet34", "resnet50"),
    *,
    config: TrainConfig | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    timing_batch: int = 32,
    timing_repeats: int = 10,
    **options: Any,
) -> ComparisonResult:
    """Train each of `models` with the same options (TrainConfig fields) and tabulate them.

    Writes OUT/comparison.csv, .md and .png, with each run in OUT/runs/<model>. Running again with
    the same `out` reuses finished runs and resumes interrupted ones.
    """
    names = _model_names(models)
    base = config_for(data, config, {**options, "out": None})
    if base.weights is not None and len(names) > 1:
        raise UserError("--weights is one architecture's file; compare several models with pretrained "
                        "weights from the cache, or with --no-pretrained")
    for name in names:  # every name and its weights, before any training
        check_weights_available(name, base.pretrained, base.weights)
    out_dir = Path(out).expanduser() if out else Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-compare"
    console = Console(quiet=not progress, highlight=False, soft_wrap=True)
    with locked_dir(out_dir):  # one comparison per OUT at a time
        splits = _shared_split(base, out_dir, console)
        runs = {}
        for name in names:
            run_dir = out_dir / "runs" / name.replace("/", "_")
            wanted = build_config({**base.model_dump(exclude_unset=True), "data": str(splits), "model": name, "out": str(run_dir)})
            console.print(f"[bold]{name}[/bold] -> {run_dir}")
            skip = PER_RUN_FIELDS | ({"lr"} if wanted.lr == "auto" else set())
            runs[name] = train_or_reuse(wanted, run_dir, progress, console, same_except=skip)
        metrics = {name: _test_metrics(run, base) for name, run in runs.items()}
        speed, machine = _time_inference(runs, base, timing_batch, timing_repeats)
        rows = [_row(name, runs[name], metrics[name], speed[name], timing_batch) for name in names]
        result = ComparisonResult(rows, out_dir, machine)
        _write_csv(rows, result.csv)
        write_text_atomic(result.markdown, _markdown(rows, machine))
        _plot(rows, result.plot)
    return result


def _model_names(models: str | list[str]) -> list[str]:
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else [str(m).strip() for m in models]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UserError("no models given: pass e.g. --models resnet18,resnet34,resnet50")
    return names


def _shared_split(cfg: TrainConfig, out_dir: Path, console: Console) -> Path:
    """OUT/splits.csv: made once, then the data source of every run (reused when OUT is reused)."""
    path, _, reused = split_once(cfg, out_dir, check=_require_test_split)
    if reused:
        console.print(f"reusing the split in {path}")
    return path


def _require_test_split(samples: list[Sample]) -> None:
    if not any(s.split == "test" for s in samples):
        raise UserError("compare evaluates every model on a held-out test split, and this data has none; "
                        "set --test-fraction above 0 or add a test/ folder")


def _test_metrics(run: Run, cfg: TrainConfig) -> dict:
    """The run's test metrics.json (written by the end-of-run report, else evaluated now)."""
    path = run.dir / "eval" / "test" / "metrics.json"
    if path.is_file() and path.stat().st_mtime >= run.checkpoint_path("best").stat().st_mtime:
        return json.loads(path.read_text())
    return run.evaluate("test", device=cfg.device, workers=cfg.workers)


def _time_inference(runs: dict[str, Run], cfg: TrainConfig, batch: int, repeats: int) -> tuple[dict, dict]:
    """Median ms per image of each model's forward pass on `batch` random images, models interleaved."""
    if batch < 1 or repeats < 1:
        raise UserError("timing_batch and timing_repeats must be at least 1")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        plan_cpu(cfg.threads, loader=False).apply()
    models, inputs = {}, {}
    for name, run in runs.items():
        size = run.preprocessing.input_size
        models[name] = run.load_model().to(device)
        inputs[name] = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for name in runs:  # warm-up: first-call allocations and kernel selection
            for _ in range(2):
                models[name](inputs[name])
        for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every model alike
            for name in runs:
                forward = partial(models[name], inputs[name])
                seconds[name].append(time_call(forward, warmup=0, repeats=1, device=device).median)
    speed = {name: 1000 * statistics.median(times) / batch for name, times in seconds.items()}
    machine = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch": batch, "repeats": repeats,
        "loadavg_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "torch": torch.__version__,
    }
    return speed, machine


def _row(name: str, run: Run, metrics: dict, ms: float, batch: int) -> dict:
    ci = metrics["bootstrap_95ci"]
    summary = run.summary
    return {
        "model": name,
        "accuracy": metrics["accuracy"],
        "accuracy_ci_low": ci["accuracy"][0],
        "accuracy_ci_high": ci["accuracy"][1],
        "f1_macro": metrics["f1_macro"],
        "f1_macro_ci_low": ci["f1_macro"][0],
        "f1_macro_ci_high": ci["f1_macro"][1],
        "params": sum(p.numel() for p in run.load_model().parameters()),
        "train_s": summary["timings"]["train_s"],
        "ms_per_image": ms,
        "timing_batch": batch,
        "test_images": metrics["n"],
        "best_epoch": summary["best_epoch"],
        "run": str(run.dir),
    }


def _write_csv(rows: list[dict], path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def format_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and text cells of the comparison table (markdown file and printed table)."""
    batch = rows[0]["timing_batch"] if rows else 0
    headers = ["model", "test accuracy (95% CI)", "test macro-F1 (95% CI)", "params (M)", "train s",
               f"ms / image (batch {batch})"]
    cells = [
        [
            r["model"],
            f"{r['accuracy']:.3f} ({r['accuracy_ci_low']:.3f}-{r['accuracy_ci_high']:.3f})",
            f"{r['f1_macro']:.3f} ({r['f1_macro_ci_low']:.3f}-{r['f1_macro_ci_high']:.3f})",
            f"{r['params'] / 1e6:.2f}",
            f"{r['train_s']:.2f}",
            f"{r['ms_per_image']:.2f}",
        ]
        for r in rows
    ]
    return headers, cells


def timing_note(machine: dict) -> str:
    load = ", ".join(f"{v:.2f}" for v in machine["loadavg_1min"] if v is not None) or "unknown"
    return (
        f"Inference: forward pass only (no decoding) of a batch of {machine['batch']} random images at each "
        f"model's input size on {machine['device']} ({machine['cpu']}, {machine['torch_threads']} torch "
        f"threads, torch {machine['torch']}), median of {machine['repeats']} after warm-up, models "
        f"interleaved; 1-minute load average before/after: {load}. Train s: the epochs' time in each run's "
        "summary.json (validation included)."
    )


def _markdown(rows: list[dict], machine: dict) -> str:
    headers, cells = format_rows(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    test_n = rows[0]["test_images"] if rows else 0
    return "\n".join(lines) + f"\n\nAll models: the same {test_n} test images.\n\n{timing_note(machine)}\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        err = [[r["accuracy"] - r["accuracy_ci_low"]], [r["accuracy_ci_high"] - r["accuracy"]]]
        ax.errorbar(r["ms_per_image"], r["accuracy"], yerr=err, fmt="o", capsize=4, color=f"C{i % 10}",
                    label=f"{r['model']} ({r['params'] / 1e6:.1f}M)")
    ax.set(xlabel=f"inference ms / image (batch {rows[0]['timing_batch']})", ylabel="test accuracy (95% CI)",
           title="accuracy vs speed on this machine")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
