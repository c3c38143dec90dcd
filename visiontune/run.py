"""A finished (or interrupted) run directory, loadable in any process with visiontune installed.

Nothing here unpickles classes: the model is rebuilt from its timm name and loaded from
safetensors, configuration and metadata are YAML / JSON.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import safetensors.torch
import timm
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError, first_line

CHECKPOINTS = ("best", "last")


class Run:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        if not (self.dir / "model.json").is_file():
            raise UserError(f"{self.dir} is not a visiontune run directory (no model.json)")

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    @cached_property
    def metadata(self) -> dict:
        metadata = read_json(self.dir / "model.json")
        missing = [key for key in ("model", "labels", "preprocessing") if key not in metadata]
        if missing:
            raise UserError(f"{self.dir / 'model.json'} is damaged: no {', '.join(missing)}")
        return metadata

    @property
    def summary(self) -> dict:
        path = self.dir / "summary.json"
        if not path.is_file():
            raise UserError(f"{self.dir} has no summary.json yet (the run has not finished)")
        return read_json(path)

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_yaml(self.dir / "config.yaml")

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def threshold(self) -> dict | None:
        """The binary decision threshold chosen on validation by `evaluate --target-recall`."""
        path = self.dir / "threshold.json"
        return read_json(path) if path.is_file() else None

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on validation by `evaluate --temperature` (1 if none)."""
        path = self.dir / "calibration.json"
        if not path.is_file():
            return 1.0
        try:
            return float(read_json(path)["temperature"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is damaged: no numeric 'temperature'") from None

    def checkpoint_path(self, which: str = "best") -> Path:
        if which not in CHECKPOINTS:
            raise UserError(f"checkpoint must be one of {CHECKPOINTS}, not {which!r}")
        path = self.dir / "checkpoints" / f"{which}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        return path

    def load_model(self, which: str = "best") -> nn.Module:
        """The trained network in eval mode, on the CPU."""
        path = self.checkpoint_path(which)
        try:
            model = timm.create_model(self.metadata["model"], pretrained=False, num_classes=len(self.labels))
        except Exception as exc:  # an edited model name or label list
            raise UserError(f"{self.dir / 'model.json'} does not describe a model: {first_line(exc, 300)}") from None
        try:
            safetensors.torch.load_model(model, str(path))
        except RuntimeError as exc:  # torch's size / key mismatch report
            raise UserError(
                f"{path} does not fit {self.dir / 'model.json'} ({self.metadata['model']}, {len(self.labels)} "
                f"labels): was either file edited or copied from another run? ({first_line(exc, 300)})"
            ) from None
        except Exception as exc:  # safetensors' own errors for a truncated or foreign file
            raise UserError(f"{path} is damaged or truncated: {first_line(exc, 300)}") from None
        return model.eval()

    # -- the API behind `evaluate`, `predict`, `explain` and `report` ------------------------------

    def evaluate(self, split: str = "test", data: str | None = None, **options) -> dict:
        """Metrics, figures and predictions in RUN/eval/<name>/, then an updated report.html."""
        from visiontune.evaluation.evaluate import evaluate_run
        from visiontune.evaluation.report import write_report

        result = evaluate_run(self, split=split, data=data, **options)
        write_report(self)
        return result

    def predict(self, paths, out: str | Path | None = None, as_frame: bool = False, **options):
        """Records (or a pandas DataFrame with `as_frame`) for image files and folders.

        With `out` (.csv or .jsonl) rows stream to the file and only the counts are returned.
        """
        from visiontune.evaluation.predict import predict

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
        from visiontune.explain import explain

        return explain(self, _as_list(paths), method=method, target=target, out_dir=out_dir, **options)

    def report(self) -> Path:
        from visiontune.evaluation.report import write_report

        return write_report(self)


def load_run(directory: str | Path) -> Run:
    """The run written to `directory`: `Run(directory)` under the API's name."""
    return Run(directory)


def _as_list(paths) -> list:
    """One path or many, as a list."""
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def read_json(path: Path) -> dict:
    """A JSON object from a run file, or one UserError naming the file and what is wrong."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is damaged (truncated or edited?): invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged: expected a JSON object")
    return value
