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
from visiontune.errors import UserError

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
        return json.loads((self.dir / "model.json").read_text())

    @property
    def summary(self) -> dict:
        path = self.dir / "summary.json"
        if not path.is_file():
            raise UserError(f"{self.dir} has no summary.json yet (the run has not finished)")
        return json.loads(path.read_text())

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_yaml(self.dir / "config.yaml")

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    def checkpoint_path(self, which: str = "best") -> Path:
        if which not in CHECKPOINTS:
            raise UserError(f"checkpoint must be one of {CHECKPOINTS}, not {which!r}")
        path = self.dir / "checkpoints" / f"{which}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        return path

    def load_model(self, which: str = "best") -> nn.Module:
        """The trained network in eval mode, on the CPU."""
        model = timm.create_model(self.metadata["model"], pretrained=False, num_classes=len(self.labels))
        safetensors.torch.load_model(model, str(self.checkpoint_path(which)))
        return model.eval()
