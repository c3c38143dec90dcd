"""The on-disk layout of every artifact visiontune writes, and the check that a directory is the
kind its reader expects.

A classifier run and an anomaly model both describe themselves in `model.json`; its `kind` and
`format_version` say which reader can open it, so handing one to the other's entry point is one
clear message naming the right one instead of a KeyError later. Files written before `kind`
existed are recognised by their older markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from visiontune.errors import UserError
from visiontune.io import read_json

FORMAT_VERSION = 1  # bump when a reader of this version could not read what a writer now writes

# Files of a directory, named once. Classifier run:
META_FILE = "model.json"  # ArtifactMeta + the kind's own fields
LABELS_FILE = "labels.json"
CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.csv"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CURATION_FILE = "curation.json"  # what --exclude / --relabel left out or relabelled
THRESHOLD_FILE = "threshold.json"
CALIBRATION_FILE = "calibration.json"
REPORT_FILE = "report.html"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = f"{CHECKPOINT_DIR}/state.pt"
# Anomaly model:
ANOMALY_WEIGHTS_FILE = "model.safetensors"
# Caption run (besides model.json, config.yaml, metrics.csv, summary.json, report.html, checkpoints/):
TOKENIZER_FILE = "tokenizer.json"
CAPTIONS_FILE = "captions.csv"  # image,caption,split: the split used, itself a valid source
ENCODER_FILE = f"{CHECKPOINT_DIR}/encoder.safetensors"

Kind = Literal["classifier", "anomaly", "caption", "detector"]
OPENED_WITH: dict[str, str] = {  # how a user opens each kind, for the wrong-entry-point message
    "classifier": "visiontune.load_run(DIR) in Python, or `visiontune evaluate / predict / explain DIR`",
    "anomaly": "visiontune.anomaly.load(DIR) in Python, or `visiontune anomaly predict / evaluate DIR`",
    "caption": "visiontune.caption.load(DIR) in Python, or `visiontune caption predict / evaluate DIR`",
    "detector": "visiontune.detect.load(DIR) in Python, or `visiontune detect predict / evaluate DIR`",
}
LEGACY_ANOMALY_FORMAT = "visiontune-anomaly/1"  # the anomaly model.json marker before `kind`


class ArtifactMeta(BaseModel):
    """The fields every `model.json` shares; each kind adds its own beside them."""

    model_config = ConfigDict(extra="allow")

    kind: Kind
    format_version: int = FORMAT_VERSION
    visiontune_version: str | None = None


class WrongArtifactError(UserError):
    """A directory holds another kind of artifact than the entry point it was given to reads."""


def meta_fields(kind: Kind, version: str) -> dict:
    """The shared head of a new `model.json`."""
    return ArtifactMeta(kind=kind, visiontune_version=version).model_dump()


def read_meta(directory: str | Path, expected: Kind) -> dict:
    """`model.json` of `directory`, checked to be an `expected` artifact this version can read.

    Raises one UserError for a missing or damaged file, another kind (naming how to open it), or a
    format written by a newer visiontune.
    """
    directory = Path(directory).expanduser()
    path = directory / META_FILE
    if not path.is_file():
        what = {"classifier": "a visiontune run directory", "anomaly": "an anomaly model directory",
                "caption": "a caption run directory", "detector": "a detector run directory"}[expected]
        raise UserError(f"{directory} is not {what} (no {META_FILE})")
    raw = read_json(path)
    try:
        meta = ArtifactMeta.model_validate({**raw, **_legacy_marker(raw)})
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise UserError(f"{path} is damaged: {'.'.join(map(str, problem['loc'])) or 'file'}: {problem['msg']}") from None
    if meta.kind != expected:
        raise WrongArtifactError(
            f"{directory} is {_article(meta.kind)} {meta.kind} model, not {_article(expected)} {expected} "
            f"{'model' if expected == 'anomaly' else 'run'}; open it with {OPENED_WITH[meta.kind]}"
        )
    if meta.format_version > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer visiontune ({meta.visiontune_version or 'unknown version'}, format "
            f"{meta.format_version}; this one reads up to {FORMAT_VERSION}): upgrade visiontune to open it"
        )
    return raw


def _legacy_marker(raw: dict) -> dict:
    """`kind` and `format_version` for a model.json written before they existed."""
    if "kind" in raw:
        return {}
    if raw.get("format") == LEGACY_ANOMALY_FORMAT:
        return {"kind": "anomaly", "format_version": 1}
    if "labels" in raw and "model" in raw:
        return {"kind": "classifier", "format_version": 1}
    return {}  # no marker at all: validation names the missing `kind`


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
