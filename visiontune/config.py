"""The training configuration: one pydantic model shared by the CLI, YAML files and the Python API.

Field names are the CLI flag names with dashes turned into underscores, so `--lr-mult 10`,
`lr_mult: 10` in YAML and `fit(..., lr_mult=10)` mean the same thing.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from visiontune.errors import UserError

# What a run written before these options existed did: resuming it must go on the same way.
LEGACY_DEFAULTS = {"probe": False, "bn": "batch", "crop_mode": "center"}
# How a run is launched, not what it computes (--batch-size is global): a resume may change them.
LAUNCH_OPTIONS = ("devices", "num_nodes", "strategy")
Schedule = Literal["flat_cos", "one_cycle", "cosine"]
Loss = Literal["ce", "bce", "focal"]
Balance = Literal["none", "sampler", "weights"]
Augment = Literal["none", "light", "medium", "heavy", "texture"]
BatchNormMode = Literal["inference", "batch"]
CropMode = Literal["center", "squash"]
Device = Literal["auto", "cpu", "cuda"]
Monitor = Literal["val_loss", "val_accuracy", "val_f1_macro"]


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit, for every command that decodes images

class TrainConfig(BaseModel):
    """Everything that decides a training run. `None` means "the model's / machine's default"."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str | None = Field(None, description="Image folder, split folder or CSV file.")
    label_regex: str | None = Field(
        None, description="Regex on file names whose group 'label' (or group 1) gives the class."
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation share when splitting.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Test share when splitting.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, gt=0, description="Images with more pixels are skipped (decompression bombs)."
    )
    exclude: str | None = Field(None, description="CSV whose 'path' column lists images to leave out (audit findings).")
    relabel: str | None = Field(
        None, description="CSV of 'path' and 'label' (or 'suggested_label'): reviewed label fixes (audit findings)."
    )

    model: str = Field("resnet50", description="Any timm model name.")
    weights: str | None = Field(None, description="Local weights file (safetensors or state dict).")
    pretrained: bool = Field(True, description="Start from pretrained weights.")
    image_size: int | None = Field(None, gt=0, description="Input size; default from the model.")
    crop_mode: CropMode = Field(
        "squash",
        description="squash: resize the whole image to a square, so nothing at its edges is lost (measured "
        "better on defects and on ants/bees, docs/benchmarks.md); center: timm's evaluation crop, the shorter "
        "side resized and the centre kept.",
    )

    epochs: int = Field(6, ge=1, description="Total epochs, frozen epochs included.")
    probe: bool | None = Field(
        None,
        description="Before any epoch, fit the head as a logistic-regression probe on frozen-backbone features "
        "(regularisation chosen on validation); fine-tuning starts from it, and it is the model kept when no "
        "later epoch beats it on validation. Default: on with pretrained weights, off from scratch.",
    )
    freeze_epochs: int = Field(0, ge=0, description="Epochs with the backbone frozen (after the probe, if any).")
    bn: BatchNormMode | None = Field(
        None,
        description="BatchNorm while the backbone trains: inference keeps the pretrained running statistics "
        "(scale and shift still train), batch normalises with each batch's statistics and updates them; "
        "default inference with pretrained weights, batch from scratch (there are no statistics to keep).",
    )
    unfreeze_from: str | None = Field(
        None, description="Keep parameters before this module (e.g. layer4) frozen throughout."
    )
    decoded_cache: bool = Field(
        True,
        description="Decode and resize each image once into a disk cache reused across epochs and runs "
        "($VISIONTUNE_CACHE, default ~/.cache/visiontune/decoded; size limit $VISIONTUNE_CACHE_GB, default 10).",
    )
    compile: bool = Field(False, description="torch.compile the network (no gain measured on CPU; GPU unmeasured).")
    feature_cache: bool = Field(
        True,
        description="Frozen stage: train the head on backbone features computed once (BatchNorm statistics "
        "fixed) instead of running the backbone every epoch.",
    )
    feature_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of the cached frozen-backbone pass; auto: bf16 on GPUs and on CPUs with native "
        "bf16 (AMX / AVX512-BF16), else fp32 (fp32 gives the same head as --no-feature-cache).",
    )
    feature_views: int | None = Field(
        None, ge=1,
        description="Augmented views per training image in the feature cache; default 1 without "
        "augmentation, else one per frozen epoch up to 4.",
    )
    train_bn: bool = Field(
        True, description="Keep BatchNorm trainable in a frozen stage that runs the backbone (--no-feature-cache)."
    )
    batch_size: int = Field(32, ge=1, description="The global batch: with several processes each takes an equal share.")
    lr: float | Literal["auto"] = Field(
        3e-4, description="Head learning rate of the trained stages, or auto: the lr range test's suggestion."
    )
    lr_mult: float = Field(10.0, ge=1, description="Backbone lr = lr / lr_mult after unfreezing.")
    weight_decay: float = Field(1e-2, ge=0)
    schedule: Schedule = "flat_cos"
    pct_start: float | None = Field(
        None, gt=0, lt=1,
        description="Share of a stage that is flat (flat_cos, default 0.75) or warming up (one_cycle, default 0.25).",
    )
    warmup_fraction: float = Field(
        0.1, ge=0, lt=1, description="Linear warm-up share of the unfrozen stage (flat_cos, cosine)."
    )
    loss: Loss = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    focal_alpha: float = Field(0.25, description="Focal loss alpha; negative disables weighting.")
    focal_gamma: float = Field(2.0, ge=0)
    balance: Balance = "none"
    augment: Augment = Field(
        "light", description="none | light | medium | heavy | texture (flips, 90-degree turns, mild light changes)."
    )
    crop_scale: float | None = Field(
        None, gt=0, le=1,
        description="Smallest share of the image area a training crop keeps; default per --augment preset "
        "(light 0.35, medium 0.25, heavy 0.08, texture 0.8). Raise it when small details decide the class.",
    )
    monitor: Monitor = Field(
        "val_accuracy", description="Chooses the best checkpoint and drives early stopping; ties go to the lower val loss."
    )
    patience: int | None = Field(None, ge=1, description="Early-stopping patience in epochs.")

    report: bool = Field(
        True, description="At the end, evaluate the best checkpoint on test (else val) and write report.html."
    )

    seed: int = 0
    device: Device = "auto"
    devices: int | Literal["auto"] = Field(
        1, description="Processes (one per GPU, or CPU processes) training together on this node (DDP); auto: "
        "every GPU. --batch-size stays the global batch, split evenly across all processes.",
    )
    num_nodes: int = Field(1, ge=1, description="Machines training together, each running --devices processes.")
    strategy: Literal["auto", "ddp"] = Field(
        "auto", description="auto: DDP when there is more than one process; ddp: DDP even for one."
    )
    workers: int | None = Field(None, ge=0, description="DataLoader workers; default from the cores free now.")
    threads: int | None = Field(None, ge=1, description="CPU torch threads; default: the cores free now.")
    out: str | None = Field(None, description="Run directory; default runs/<timestamp>-<model>.")

    @field_validator("lr", mode="before")
    @classmethod
    def _parse_lr(cls, value: Any) -> Any:
        """Numbers as numbers (also "3e-4" from the command line), else only "auto"."""
        if value == "auto":
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not number > 0:
            raise ValueError(f"lr must be a positive number or 'auto', not {value!r}")
        return number

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: Any) -> Any:
        """A count (also "4" from the command line) of at least 1, or "auto"."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"devices must be a whole number of at least 1 or 'auto', not {value!r}")

    @model_validator(mode="after")
    def _check_consistency(self) -> TrainConfig:
        if self.freeze_epochs > self.epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) exceeds epochs ({self.epochs})")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self

    @property
    def pretrained_start(self) -> bool:
        return bool(self.pretrained or self.weights)

    @property
    def use_probe(self) -> bool:
        """`probe` resolved: a probe of a random backbone's features is no head to fine-tune from."""
        return self.pretrained_start if self.probe is None else self.probe

    @property
    def bn_statistics(self) -> str:
        """`bn` resolved: pretrained statistics are worth keeping, a random init's are not."""
        return self.bn or ("inference" if self.pretrained_start else "batch")

    # -- YAML -----------------------------------------------------------------------------------

    def to_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, missing: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
        """The config in `path`; `missing` fills keys the file lacks, `overrides` win over it."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise UserError(f"{path} must hold a mapping of option names to values")
        return build_config({**(missing or {}), **values, **overrides}, source=str(path))


def config_for(data: Any, config: TrainConfig | None, options: dict[str, Any]) -> TrainConfig:
    """The Python API's convention: a data source, an optional base config, option overrides."""
    values = {**(config.model_dump(exclude_unset=True) if config else {}), **options}
    if data is not None:
        values["data"] = str(data)
    cfg = build_config(values)
    if not cfg.data:
        raise UserError("no data given: pass an image folder or CSV file")
    return cfg


def build_config(values: dict[str, Any], source: str = "options") -> TrainConfig:
    """Validate `values` into a TrainConfig, turning mistakes into one readable UserError."""
    unknown = [key for key in values if key not in TrainConfig.model_fields]
    if unknown:
        raise UserError("; ".join(_unknown_key_message(key, source) for key in unknown))
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "config"
            problems.append(f"{where}: {err['msg']}")
        raise UserError(f"invalid {source}: " + "; ".join(problems)) from None


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, list(TrainConfig.model_fields), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown option '{key}' in {source}{hint}"
