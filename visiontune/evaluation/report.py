"""RUN/report.html: one self-contained page (images inlined, no network) a person can read.

Built only from files already in the run directory (summary, metrics, eval/*/metrics.json and
figures), so it can be regenerated at any time with `visiontune report RUN`. The page itself is
reporting/templates/classification.html; this module only gathers what it shows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from visiontune.evaluation.evaluate import HONESTY_NOTE
from visiontune.models.classifier_run import ClassifierRun
from visiontune.reporting.html import render_page
from visiontune.runformat import METRICS_FILE, REPORT_FILE

SECTIONS = ("config", "data", "training", "evaluation", "explanations", "timings")


def write_report(run: ClassifierRun) -> Path:
    summary = run.summary
    history = _read_csv(run.dir / METRICS_FILE)
    history_png = run.dir / "history.png"
    return render_page(
        "classification.html", run.dir / REPORT_FILE,
        title=f"visiontune report: {run.dir.name}", model=run.metadata["model"], labels=run.labels,
        device=summary.get("device", "?"), run_dir=str(run.dir),
        config={k: v for k, v in run.config.model_dump().items() if v is not None},
        splits=[s for s in ("train", "val", "test") if sum(summary["counts"][s].values())],
        counts=summary["counts"], checks=summary.get("data_checks", {"errors": [], "warnings": []}),
        skipped=summary["skipped"], best_epoch=summary["best_epoch"], epochs_run=summary["epochs_run"],
        monitor=summary["monitor"], history_png=history_png if history_png.is_file() else None,
        kept=summary.get("kept"), probe=summary.get("probe"),
        history=history, history_columns=list(history[0]) if history else [],
        honesty=HONESTY_NOTE, evals=[_load_eval(path) for path in sorted((run.dir / "eval").glob("*/metrics.json"))],
        explanations=_explanations(run.dir / "eval"), timings=summary["timings"],
    )


def _load_eval(path: Path) -> dict:
    """An evaluation's metrics with its figures as the paths of those present on disk."""
    result = json.loads(path.read_text())
    figures = {key: path.parent / name for key, name in result.get("figures", {}).items()}
    result["images"] = {key: file for key, file in figures.items() if file.is_file()}
    return result


def _explanations(eval_dir: Path) -> list[dict]:
    return [{"image": png, "caption": f"{png.parent.parent.name}: {png.stem}"}
            for png in sorted(eval_dir.glob("*/explanations/*.png"))]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))
