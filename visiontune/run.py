"""A finished (or interrupted) classifier run, with the commands that work on it as methods.

`Run` is `ClassifierRun` (reading the directory) plus thin conveniences over the evaluation,
prediction, explanation and report functions; `load_run` opens one and says so plainly when the
directory holds another kind of artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from visiontune.errors import UserError
from visiontune.evaluation.evaluate import evaluate_run
from visiontune.evaluation.predict import predict
from visiontune.evaluation.report import write_report
from visiontune.explain.explainer import explain
from visiontune.models.classifier_run import ClassifierRun


class Run(ClassifierRun):
    # -- the API behind `evaluate`, `predict`, `explain` and `report` ------------------------------

    def evaluate(self, split: str = "test", data: str | None = None, **options) -> dict:
        """Metrics, figures and predictions in RUN/eval/<name>/, then an updated report.html."""
        result = evaluate_run(self, split=split, data=data, **options)
        write_report(self)
        return result

    def predict(self, paths, out: str | Path | None = None, as_frame: bool = False, **options):
        """Records (or a pandas DataFrame with `as_frame`) for image files and folders.

        With `out` (.csv or .jsonl) rows stream to the file and only the counts are returned.
        """
        result = predict(self, _as_list(paths), out=out, **options)
        if as_frame:
            try:
                import pandas
            except ImportError:
                raise UserError("as_frame=True needs pandas (pip install pandas)") from None
            return pandas.DataFrame(result.rows)
        return result

    def explain(self, paths, method: str = "gradcam", target: str | None = None,
                out_dir: str | Path | None = None, **options) -> list[dict]:
        """Overlay PNGs of the regions that drove the prediction (default out_dir RUN/explain)."""
        return explain(self, _as_list(paths), method=method, target=target, out_dir=out_dir, **options)

    def report(self) -> Path:
        return write_report(self)


def load_run(directory: str | Path) -> Run:
    """The classifier run in `directory`; another kind of artifact is one message naming its API."""
    return Run(directory)


def _as_list(paths) -> list:
    """One path or many, as a list (a sequence, e.g. a packed PathList, as it is)."""
    if isinstance(paths, (str, Path)):
        return [paths]
    return paths if isinstance(paths, Sequence) else list(paths)


