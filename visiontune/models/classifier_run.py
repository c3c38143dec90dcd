"""A classifier run directory as the layers below the API read it: labels, preprocessing, config,
summary, decision threshold, temperature, and the trained network.

Nothing here unpickles classes: the model is rebuilt from its timm name and loaded from
safetensors, configuration and metadata are YAML / JSON. `visiontune.run.Run` adds evaluate,
predict, explain and report on top.
"""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path

import safetensors.torch
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.transforms import Preprocessing
from visiontune.errors import UserError, first_line
from visiontune.io import read_json
from visiontune.models.backbones import create_model
from visiontune.runformat import (
    CALIBRATION_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    META_FILE,
    SPLITS_FILE,
    SUMMARY_FILE,
    THRESHOLD_FILE,
    read_meta,
)

CHECKPOINTS = ("best", "last")


class ClassifierRun:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        self._meta = read_meta(self.dir, "classifier")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.dir)!r})"

    @cached_property
    def metadata(self) -> dict:
        metadata = self._meta
        missing = [key for key in ("model", "labels", "preprocessing") if key not in metadata]
        if missing:
            raise UserError(f"{self.dir / META_FILE} is damaged: no {', '.join(missing)}")
        return metadata

    @property
    def summary(self) -> dict:
        path = self.dir / SUMMARY_FILE
        if not path.is_file():
            raise UserError(f"{self.dir} has no summary.json yet (the run has not finished)")
        return read_json(path)

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_yaml(self.dir / CONFIG_FILE)

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def threshold(self) -> dict | None:
        """The binary decision threshold chosen on validation by `evaluate --target-recall`."""
        path = self.dir / THRESHOLD_FILE
        return read_json(path) if path.is_file() else None

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on validation by `evaluate --temperature` (1 if none)."""
        path = self.dir / CALIBRATION_FILE
        if not path.is_file():
            return 1.0
        try:
            return float(read_json(path)["temperature"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is damaged: no numeric 'temperature'") from None

    def split_paths(self, split: str) -> list[Path]:
        """The images RUN/splits.csv puts in `split`, in its order (relative paths resolved against
        the run directory); none without the file."""
        return [path for path, _ in self.split_samples(split)]

    def split_samples(self, split: str) -> list[tuple[Path, str]]:
        """(image, label) of each row of RUN/splits.csv in `split`, as `split_paths` lists them."""
        path = self.dir / SPLITS_FILE
        if not path.is_file():
            return []
        with path.open(newline="") as handle:
            rows = [(row["path"], row.get("label", "")) for row in csv.DictReader(handle) if row.get("split") == split]
        return [(Path(p) if Path(p).is_absolute() else self.dir / p, label) for p, label in rows]

    def checkpoint_path(self, which: str = "best") -> Path:
        if which not in CHECKPOINTS:
            raise UserError(f"checkpoint must be one of {CHECKPOINTS}, not {which!r}")
        path = self.dir / CHECKPOINT_DIR / f"{which}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        return path

    def load_model(self, which: str = "best") -> nn.Module:
        """The trained network in eval mode, on the CPU."""
        path = self.checkpoint_path(which)
        try:
            model = create_model(self.metadata["model"], num_classes=len(self.labels))
        except Exception as exc:  # an edited model name or label list
            raise UserError(f"{self.dir / META_FILE} does not describe a model: {first_line(exc, 300)}") from None
        try:
            safetensors.torch.load_model(model, str(path))
        except RuntimeError as exc:  # torch's size / key mismatch report
            raise UserError(
                f"{path} does not fit {self.dir / META_FILE} ({self.metadata['model']}, {len(self.labels)} "
                f"labels): was either file edited or copied from another run? ({first_line(exc, 300)})"
            ) from None
        except Exception as exc:  # safetensors' own errors for a truncated or foreign file
            raise UserError(f"{path} is damaged or truncated: {first_line(exc, 300)}") from None
        return model.eval()
