"""Faster R-CNN (torchvision) on a fine-tuned or pretrained backbone, trained end to end.

Two architectures. The default, light enough for a 2-core CPU: a timm `features_only` backbone
(tf_efficientnet_lite0 unless `model` says otherwise), its last three levels (strides 8, 16, 32)
through torchvision's FeaturePyramidNetwork, and a small box head, in torchvision's FasterRCNN at
a small input size; batch norm is frozen (a few images per batch cannot estimate it).
`fasterrcnn_resnet50_fpn_v2` is torchvision's, its ResNet-50 initialised from the user's weights:
a state dict in timm or torchvision names, or a visiontune classifier run of a ResNet-50. Nothing
is ever downloaded: pretrained weights that are not here are one message naming the ways out.

Training: SGD (or AdamW) with a linear warm-up then cosine, horizontal flips, validation mAP@0.5
after every epoch, the best epoch kept (safetensors) and training stopped after `patience`
epochs without a better one (or, with `time_limit_s`, mid-epoch once the time is up).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Literal, Sequence

import numpy as np
import safetensors.torch
import timm
import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, RPNHead, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.detect.evaluation import average_precision_50, match_all
from visiontune.detect.types import Detections, ImageTargets
from visiontune.devices import plan_cpu, resolve_device
from visiontune.errors import UserError, WeightsUnavailableError
from visiontune.io import write_csv_atomic
from visiontune.models.backbones import check_weights_available, create_model, load_weights_file
from visiontune.models.classifier_run import ClassifierRun
from visiontune.runformat import CHECKPOINT_DIR, META_FILE, METRICS_FILE
from visiontune.training.checkpoint import save_model
from visiontune.training.schedules import lr_factor

log = logging.getLogger(__name__)
RESNET_ARCH = "fasterrcnn_resnet50_fpn_v2"
WEIGHTS_FILE = f"{CHECKPOINT_DIR}/best.safetensors"
ANCHOR_FRACTIONS = (0.05, 0.1, 0.2, 0.4)  # anchor sides as fractions of min_size, one per pyramid level
BOX_HEAD_WIDTH = 256
WARMUP = 0.1
GRADIENT_CLIP = 10.0
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
METRIC_FIELDS = ["epoch", "lr", "train_loss", "val_map_50", "seconds"]
# timm-fpn samples fewer proposals and regions than torchvision's defaults (2000 / 1000 proposals,
# 512 regions per image): the region head dominated a CPU forward pass at 320 px.
LIGHT_PROPOSALS = dict(rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
                       rpn_post_nms_top_n_test=300, box_batch_size_per_image=128)
STATE_PREFIXES = ("module.", "_orig_mod.", "backbone.body.", "body.", "backbone.", "model.")


class FasterRCNNOptions(BaseModel):
    """How `detect fit --method faster-rcnn` builds and trains; dumped into model.json as `faster_rcnn`."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["timm-fpn", "fasterrcnn_resnet50_fpn_v2"] = "timm-fpn"
    model: str = "tf_efficientnet_lite0"  # the timm backbone of timm-fpn
    weights: str | None = None  # a weights file or a visiontune classifier run directory
    pretrained: bool = True
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float | None = Field(None, gt=0)  # [default: 0.01 for SGD, 1e-3 for AdamW]
    optimizer: Literal["sgd", "adamw"] = "sgd"
    weight_decay: float = Field(1e-4, ge=0)
    min_size: int = Field(320, ge=32)  # the shorter side images are resized to
    max_size: int = Field(512, ge=32)
    fpn_channels: int = Field(96, ge=8)
    # the anchors' height / width at every location (torchvision's aspect_ratios, in its order);
    # long thin objects (cracks) want 0.25 and 4 too
    anchor_ratios: tuple[Annotated[float, Field(gt=0)], ...] = Field((0.5, 1.0, 2.0), min_length=1)
    hflip: bool = True
    freeze_early: bool = True  # timm-fpn: the stem and the stride-2 and -4 stages stay as they are
    patience: int = Field(4, ge=1)
    time_limit_s: float | None = Field(None, gt=0)  # stop (validate, keep the best) once training took this long
    score_floor: float = Field(0.01, ge=0, le=1)  # boxes below are not returned at all
    seed: int = 0
    device: str = "auto"
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)


class TimmFPN(nn.Module):
    """A timm `features_only` network's last three levels through an FPN (plus a max-pooled level)."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels()[-3:], out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.body(x)[-3:]
        return self.fpn(OrderedDict((str(i), level) for i, level in enumerate(levels)))


class FasterRCNNDetector:
    """A trained Faster R-CNN as a `Detector`: torchvision's own per-class NMS, boxes above `score_floor`."""

    def __init__(self, model: FasterRCNN, classes: list[str], device: torch.device, batch_size: int = 4) -> None:
        self.model = model.to(device).eval()
        self.classes = list(classes)
        self.device = device
        self.batch_size = batch_size

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        out = []
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = [_to_tensor(image).to(self.device) for image in images[start:start + self.batch_size]]
                for result in self.model(chunk):
                    out.append(Detections(result["boxes"].cpu().numpy(), result["scores"].cpu().numpy(),
                                          result["labels"].cpu().numpy() - 1))  # torchvision's 0 is background
        return out


def check_options(options: FasterRCNNOptions) -> None:
    """Fail before any data is read when the backbone or its weights cannot be had."""
    _resolved_weights(options)


def build_model(options: FasterRCNNOptions, num_classes: int, initialise: bool = True) -> FasterRCNN:
    """The network for `num_classes` classes (+ background); `initialise` loads the backbone's
    weights (training), otherwise the trained weights are loaded afterwards (a run read back)."""
    torch.manual_seed(options.seed)
    common = dict(min_size=options.min_size, max_size=options.max_size, box_score_thresh=options.score_floor)
    if options.arch == RESNET_ARCH:
        backbone = resnet50()
        if initialise and options.pretrained:
            _load_resnet50(backbone, _resnet_state(options))
        fpn = _resnet_fpn_extractor(backbone, 3, norm_layer=nn.BatchNorm2d)
        anchors = _anchors(options.min_size, options.anchor_ratios, levels=5)
        return FasterRCNN(
            fpn, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
            rpn_head=RPNHead(fpn.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead((fpn.out_channels, 7, 7), [256, 256, 256, 256], [1024],
                                        norm_layer=nn.BatchNorm2d), **common)
    weights = _resolved_weights(options) if initialise else None
    body = create_model(options.model, pretrained=initialise and options.pretrained, weights=weights,
                        features_only=True)
    if options.freeze_early:
        _freeze_early_stages(body)
    backbone = TimmFPN(freeze_batch_norm_2d(body), options.fpn_channels)
    config = body.pretrained_cfg
    anchors = _anchors(options.min_size, options.anchor_ratios, levels=4)
    pooler = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone, rpn_anchor_generator=anchors, box_roi_pool=pooler,
        box_head=TwoMLPHead(options.fpn_channels * 7 * 7, BOX_HEAD_WIDTH),
        box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, num_classes + 1),
        image_mean=list(config.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(config.get("std", (0.229, 0.224, 0.225))), **LIGHT_PROPOSALS, **common)


def fit_faster_rcnn(train: list[ImageTargets], val: list[ImageTargets], classes: list[str], out: Path,
                    options: FasterRCNNOptions) -> FasterRCNNDetector:
    """Train on `train`, keep the epoch with the best `val` mAP@0.5 in OUT/checkpoints/best.safetensors."""
    out = Path(out)
    device = resolve_device(options.device)
    if device.type == "cpu":
        plan_cpu(loader=False).apply()
    model = build_model(options, len(classes)).to(device)
    detector = FasterRCNNDetector(model, classes, device, options.batch_size)
    parameters = [p for p in model.parameters() if p.requires_grad]
    lr = options.lr or DEFAULT_LR[options.optimizer]
    optimizer = (torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=options.weight_decay)
                 if options.optimizer == "sgd" else
                 torch.optim.AdamW(parameters, lr=lr, weight_decay=options.weight_decay))
    steps_per_epoch = -(-len(train) // options.batch_size)
    total = steps_per_epoch * options.epochs
    val_images = _decode([t.path for t in val], options.max_pixels)
    generator = np.random.default_rng(options.seed)
    write_csv_atomic(out / METRICS_FILE, METRIC_FIELDS, [])
    best, best_epoch, rows = -1.0, 0, []
    fit_started = time.perf_counter()
    out_of_time = False
    for epoch in range(1, options.epochs + 1):
        started = time.perf_counter()
        model.train()
        losses = []
        order = generator.permutation(len(train))
        for step in range(steps_per_epoch):
            batch = [train[i] for i in order[step * options.batch_size:(step + 1) * options.batch_size]]
            step_lr = lr * lr_factor("cosine", (epoch - 1) * steps_per_epoch + step, total, warmup_fraction=WARMUP)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            images, targets = _training_batch(batch, options, generator, device)
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(parameters, GRADIENT_CLIP)
            optimizer.step()
            losses.append(float(loss.detach()))
            out_of_time = options.time_limit_s is not None and time.perf_counter() - fit_started > options.time_limit_s
            if out_of_time:
                log.warning("time limit of %.0f s reached at step %d of epoch %d", options.time_limit_s, step + 1, epoch)
                break
        score = average_precision_50(match_all(detector.detect_batch(val_images), val, len(classes)), len(classes))[0]
        if score > best:
            best, best_epoch = score, epoch
            save_model(out / WEIGHTS_FILE, model, {"epoch": str(epoch), "val_map_50": str(score)})
        rows.append({"epoch": epoch, "lr": step_lr, "train_loss": float(np.mean(losses)), "val_map_50": score,
                     "seconds": time.perf_counter() - started})
        write_csv_atomic(out / METRICS_FILE, METRIC_FIELDS, rows)
        log.info("epoch %d/%d  loss %.3f  val mAP@0.5 %.3f%s  (%.1f s)", epoch, options.epochs, rows[-1]["train_loss"],
                 score, "  *" if epoch == best_epoch else "", rows[-1]["seconds"])
        if out_of_time or epoch - best_epoch >= options.patience:
            break
    safetensors.torch.load_model(model, str(out / WEIGHTS_FILE))
    return FasterRCNNDetector(model, classes, device, options.batch_size)


def load_faster_rcnn(run_dir: Path, meta: dict, device: str = "auto") -> FasterRCNNDetector:
    """The detector of a run written by `fit_faster_rcnn` (architecture from model.json, weights safetensors)."""
    run_dir = Path(run_dir)
    try:
        options = FasterRCNNOptions.model_validate(meta["faster_rcnn"])
        classes = [str(c) for c in meta["classes"]]
    except Exception as exc:  # a missing key or an edited value
        raise UserError(f"{run_dir / META_FILE} is damaged: no valid faster_rcnn options and classes ({exc})") from None
    model = build_model(options, len(classes), initialise=False)
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the run has no finished epoch")
    try:
        safetensors.torch.load_model(model, str(path))
    except Exception as exc:  # a foreign, edited or truncated file
        raise UserError(f"{path} does not fit {run_dir / META_FILE}: {str(exc).splitlines()[0][:300]}") from None
    return FasterRCNNDetector(model, classes, resolve_device(device), options.batch_size)


def _freeze_early_stages(body: nn.Module) -> None:
    """No gradient for the parameters up to the stride-4 level (as torchvision's default of three
    trainable ResNet stages): the high-resolution layers cost most of the backward pass."""
    names = body.feature_info.module_name()
    if len(names) < 4:
        return
    prefixes = (names[-4] + ".", names[-4].replace(".", "_") + ".")
    parameters = list(body.named_parameters())
    last = max((i for i, (name, _) in enumerate(parameters) if name.startswith(prefixes)), default=-1)
    for _, parameter in parameters[:last + 1]:
        parameter.requires_grad_(False)


def _anchors(min_size: int, ratios: tuple[float, ...], levels: int) -> AnchorGenerator:
    sizes = [max(4, round(min_size * f)) for f in ANCHOR_FRACTIONS]
    sizes = (sizes + [sizes[-1] * 2 ** (k + 1) for k in range(levels - len(sizes))])[:levels]
    return AnchorGenerator(tuple((s,) for s in sizes), (tuple(ratios),) * levels)


def _resolved_weights(options: FasterRCNNOptions) -> str | None:
    """The weights file of timm-fpn (a classifier run's best checkpoint for a run directory)."""
    if options.arch == RESNET_ARCH:
        if options.pretrained and options.weights is None:
            raise WeightsUnavailableError(
                f"{RESNET_ARCH} is not downloaded here: pass --weights with a ResNet-50 state dict (timm or "
                "torchvision names, safetensors) or a visiontune classifier run of a ResNet-50, or --no-pretrained")
        if options.weights is not None:
            _weights_path(options.weights, "resnet50")
        return None
    weights = None if options.weights is None else _weights_path(options.weights, options.model)
    check_weights_available(options.model, options.pretrained, weights)
    return weights


def _weights_path(weights: str, expected_model: str) -> str:
    """A weights file as given, or the best checkpoint of a classifier run of `expected_model`."""
    path = Path(weights).expanduser()
    if not path.is_dir():
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        return str(path)
    run = ClassifierRun(path)
    trained = str(run.metadata["model"])
    if trained != expected_model and not (expected_model == "resnet50" and trained.startswith("resnet50")):
        raise UserError(f"{path} is a run of {trained}, not {expected_model}: pass --model {trained} or another run")
    checkpoint = run.checkpoint_path("best")
    if checkpoint.suffix != ".safetensors":
        raise UserError(f"{checkpoint}: only safetensors checkpoints are read")
    return str(checkpoint)


def _resnet_state(options: FasterRCNNOptions) -> dict[str, torch.Tensor]:
    state = load_weights_file(_weights_path(options.weights, "resnet50"))
    renamed = {}
    for key, value in state.items():
        for prefix in STATE_PREFIXES:
            key = key.removeprefix(prefix)
        renamed[key] = value
    return renamed


def _load_resnet50(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every ResNet-50 tensor but the classifier from `state`, with one message when they do not fit
    (timm's ResNet-50 uses torchvision's names, so both load as they are)."""
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and not k.startswith("fc.") and v.shape == own[k].shape}
    missing = [k for k in own if k not in usable and not k.startswith("fc.") and "num_batches_tracked" not in k]
    if missing:
        raise UserError(f"the weights do not fit a ResNet-50: {len(missing)} of {len(own)} tensors missing or "
                        f"mismatched (e.g. {', '.join(missing[:3])})")
    backbone.load_state_dict(usable, strict=False)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255)  # a copy: PIL arrays are read-only


def _decode(paths: Sequence[Path], max_pixels: int) -> list[np.ndarray]:
    """RGB arrays of images `load_annotations` already found readable (a file that broke since is an error)."""
    images = []
    for path in paths:
        try:
            images.append(np.asarray(load_rgb(path, max_pixels)))
        except ImageLoadError as exc:
            raise UserError(f"{path} can no longer be read: {exc}") from None
    return images


def _training_batch(batch: list[ImageTargets], options: FasterRCNNOptions, rng: np.random.Generator,
                    device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = [], []
    for target, image in zip(batch, _decode([t.path for t in batch], options.max_pixels)):
        boxes = target.boxes.copy()
        if options.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = image.shape[1] - boxes[:, [2, 0]]
        images.append(_to_tensor(image).to(device))
        targets.append({"boxes": torch.from_numpy(boxes).to(device),
                        "labels": torch.from_numpy(target.labels + 1).to(device)})
    return images, targets
