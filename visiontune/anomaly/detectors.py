"""The anomaly detectors by name: `anomaly fit --method`, saved models and the CLI choose here."""

from __future__ import annotations

from visiontune.anomaly.base import PatchDetector
from visiontune.anomaly.padim import Padim
from visiontune.anomaly.patchcore import PatchCore
from visiontune.anomaly.reverse_distillation import ReverseDistillation

DETECTORS: dict[str, type[PatchDetector]] = {cls.method: cls for cls in (PatchCore, Padim, ReverseDistillation)}
