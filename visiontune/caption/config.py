"""Everything that decides a caption run, shared by the CLI (`--decoder-layers` is
`decoder_layers`), `config.yaml` and `visiontune.caption.fit(...)`. `None` means the model's default."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.errors import UserError


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str = Field(description="CSV of image,caption[,split] rows, or a COCO captions JSON.")
    out: str | None = Field(None, description="Run directory [default: runs/<time>-caption-<model>].")
    model: str = Field("resnet50", description="Any timm CNN name (the frozen encoder).")
    weights: str | None = Field(None, description="Local encoder weights (safetensors or state dict).")
    pretrained: bool = Field(True, description="Pretrained encoder weights.")
    image_size: int | None = Field(None, gt=0, description="Input size; default from the model.")
    features: Literal["grid", "pooled", "multi"] = Field(
        "grid", description="grid: the last layer's spatial grid; pooled: one averaged vector; multi: several layers.")
    layers: list[str] | None = Field(None, description="Encoder layers [default: the last; multi: the last two].")
    decoder: Literal["transformer", "lstm"] = Field("transformer", description="transformer | lstm (soft attention).")
    width: int = Field(256, gt=0, description="Decoder width; encoder features are projected to it.")
    decoder_layers: int = Field(2, gt=0, description="Transformer decoder layers.")
    heads: int = Field(4, gt=0, description="Attention heads of the Transformer decoder.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Decoder dropout.")
    max_length: int = Field(32, ge=4, description="Longest caption in tokens, BOS and EOS included.")
    min_frequency: int = Field(1, ge=1, description="Training-caption count a word needs to enter the vocabulary.")
    epochs: int = Field(30, gt=0, description="Most epochs.")
    patience: int = Field(5, ge=1, description="Stop after this many epochs without a better validation score.")
    monitor: Literal["cider", "bleu4"] = Field("cider", description="Validation score that picks the kept epoch.")
    batch_size: int = Field(64, gt=0, description="Captions per step.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW, warm-up then cosine).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the word loss.")
    beam: int = Field(3, gt=0, description="Beam width of the final evaluation (validation uses greedy decoding).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation share of images when splitting.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Test share of images when splitting.")
    seed: int = Field(0, description="Seed of the split, initialisation and batch order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    workers: int | None = Field(None, ge=0, description="Image loading processes for feature extraction.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Larger images are skipped (decompression bombs).")
    report: bool = Field(True, description="Write report.html after training.")


def build_caption_config(**options: object) -> CaptionConfig:
    """A CaptionConfig from given options (None ones left to the defaults); bad values are one message."""
    try:
        return CaptionConfig(**{name: value for name, value in options.items() if value is not None})
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "options"
        raise UserError(f"invalid caption option {where}: {problem['msg']}") from None
