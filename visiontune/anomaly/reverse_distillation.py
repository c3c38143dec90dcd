"""Reverse distillation (Deng & Li, CVPR 2022): a student rebuilds the frozen backbone's features
from a compact one-class embedding of them, and fails where an image is unlike the good ones.

The teacher is the backbone itself, frozen and fed without augmentation, so the teacher features
of the training images are computed once (the embedding stream) and the student trains on them in
memory: no backbone forward per epoch. The student pools every level to the coarsest grid, fuses
them into about a quarter of their channels and halves that grid when it is large enough (the
one-class bottleneck), then decodes back up through each level's grid, predicting that level's
features there. Loss and score are the cosine distance between teacher and student features at
each position, averaged over the levels, as in the paper; image scores come from the smoothed map
(components/anomaly_map.MapScoring). Training is a fixed number of epochs: the default 16 took 2.4
minutes (one torch thread, the other of 2 cores busy) for 257 images of 256 px with
tf_efficientnet_lite0; far fewer images train far fewer steps, and less well.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.anomaly.base import PatchDetector
from visiontune.anomaly.calibration import EMBEDDING_BUDGET
from visiontune.anomaly.components.features import patch_embedding
from visiontune.errors import UserError

GROUPS = 8  # GroupNorm groups: unlike BatchNorm, a score does not depend on the other images of a batch
# The coarsest grid is halved into the embedding only when that leaves at least this many rows and
# columns, as the paper's 16x16 -> 8x8 at 256 px. On synthetic scratches (200 training images,
# random-init lite0 features) halving gave image AUROC 0.96 against 0.90 at 256 px, but at 96 px,
# 6x6 -> 3x3, 0.72 against 0.94.
MIN_EMBEDDING_GRID = 6
# "nearest-exact" up and down again gives back each level exactly, for any sizes.
RESIZE = "nearest-exact"


class ReverseDistillation(PatchDetector):
    """Fitted: student_ (a `Student` in eval mode).

    epochs: passes over the training images; batch_size: images per Adam step; learning_rate: Adam's.
    levels: (channels, height, width) of the backbone maps, finest first, taken from the first maps
    embedded when not given, so that a fold's copy of the detector (`params`) and a reloaded one
    split embeddings into the same levels. seed: the student's initial weights and the shuffling.
    """

    method = "reverse-distillation"
    default_strides = (4, 8, 16)  # the backbone levels embedded when no --layers are given

    def __init__(self, epochs: int = 16, batch_size: int = 8, learning_rate: float = 5e-3,
                 levels: Sequence[Sequence[int]] | None = None, seed: int = 0) -> None:
        checks = [
            (isinstance(epochs, int) and epochs >= 1, f"epochs must be a positive integer, got {epochs!r}"),
            (isinstance(batch_size, int) and batch_size >= 1,
             f"batch_size must be a positive integer, got {batch_size!r}"),
            (learning_rate > 0, f"learning_rate must be positive, got {learning_rate!r}"),
            (levels is None or (len(levels) > 0 and all(len(lv) == 3 and min(lv) >= 1 for lv in levels)),
             f"levels must be (channels, height, width) of each backbone map, got {levels!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.levels = [tuple(int(n) for n in level) for level in levels] if levels else None
        self.seed = seed

    @classmethod
    def from_options(cls, seed: int, **_) -> ReverseDistillation:
        """Built from `anomaly fit`'s options; those of other detectors are ignored."""
        return cls(seed=seed)

    def params(self) -> dict:
        return dict(epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                    levels=[list(level) for level in self.levels] if self.levels else None, seed=self.seed)

    def embed(self, maps: list[torch.Tensor]) -> torch.Tensor:
        levels = [tuple(m.shape[1:]) for m in maps]
        if self.levels is None:
            self.levels = levels
        elif levels != self.levels:
            raise ValueError(f"backbone maps {levels} do not match this detector's levels {self.levels}")
        return patch_embedding(maps, pool_size=1, mode=RESIZE)

    def fit(self, embeddings: Iterable[torch.Tensor]) -> ReverseDistillation:
        with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
            teacher = self._teacher_in_memory(embeddings)
            images = len(teacher[0])
            generator = torch.Generator().manual_seed(self.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                student = Student(self.levels).to(teacher[0].device)
            optimizer = torch.optim.Adam(student.parameters(), lr=self.learning_rate)
            for _ in range(self.epochs):
                order = torch.randperm(images, generator=generator).to(teacher[0].device)
                for batch in order.split(self.batch_size):
                    targets = [level[batch] for level in teacher]
                    loss = torch.stack([d.mean() for d in _distances(targets, student(targets))]).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        self.student_ = student.eval().requires_grad_(False)
        return self

    def _teacher_in_memory(self, embeddings: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Each level [images, C, h, w] on its own grid, as plain tensors (the stream's are inference
        tensors, which autograd cannot save); refused past EMBEDDING_BUDGET bytes."""
        parts: list[list[torch.Tensor]] = []  # per level; `levels` is known once the first batch is embedded
        held = images = 0
        for embedding in embeddings:
            levels = self._split(embedding)
            parts = parts or [[] for _ in levels]
            for kept, level in zip(parts, levels):
                kept.append(level.clone(memory_format=torch.contiguous_format))
                held += level.numel() * level.element_size()
            images += len(embedding)
            if held > EMBEDDING_BUDGET:
                raise UserError(
                    f"reverse distillation trains on the training images' features in memory, and those of "
                    f"{images} images already exceed {EMBEDDING_BUDGET / 2**30:g} GiB; fit on fewer images, "
                    f"a smaller --image-size, or fewer or earlier --layers")
        teacher = []
        for kept in parts:  # one level's batches freed as soon as they are joined
            teacher.append(torch.cat(kept))
            kept.clear()
        return teacher

    def _split(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """The embedding's levels, each back on its own grid."""
        parts = embedding.split([channels for channels, _, _ in self.levels], dim=1)
        return [part if part.shape[-2:] == (h, w) else F.interpolate(part, size=(h, w), mode=RESIZE)
                for part, (_, h, w) in zip(parts, self.levels)]

    def score(self, embedding: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.score_levels(self._split(embedding), embedding.shape[-2:]), None

    def score_levels(self, teacher: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Patch scores [B, *size] from the backbone's levels, as `score` splits them from the embedding
        (the ONNX export starts here: the nearest-exact resizing of the split has no ONNX form)."""
        maps = [F.interpolate(d[:, None], size=size, mode="bilinear") if d.shape[-2:] != size else d[:, None]
                for d in _distances(teacher, self.student_(teacher))]
        return torch.cat(maps, dim=1).mean(dim=1)

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {f"student.{name}": value for name, value in self.student_.state_dict().items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> ReverseDistillation:
        if self.levels is None:
            raise ValueError("restoring a reverse distillation student needs its levels")
        with torch.device("meta"):
            student = Student(self.levels)
        weights = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
        student.load_state_dict(weights, strict=True, assign=True)
        self.student_ = student.eval().requires_grad_(False)
        return self

    def to(self, device: torch.device) -> ReverseDistillation:
        self.student_.to(device)
        return self


class Student(nn.Module):
    """One-class bottleneck and decoder: teacher levels [B, C, h, w] (finest first) in, student
    predictions of the same shapes out."""

    def __init__(self, levels: Sequence[tuple[int, int, int]]) -> None:
        super().__init__()
        channels = [c for c, _, _ in levels]
        self.sizes = [(h, w) for _, h, w in levels]
        width = _rounded(sum(channels) / 4)
        self.fuse = _conv_block(sum(channels), width)
        self.squeeze = _conv_block(width, width, stride=2 if min(self.sizes[-1]) >= 2 * MIN_EMBEDDING_GRID else 1)
        self.stages, self.heads = nn.ModuleList(), nn.ModuleList()
        for c in reversed(channels):  # decoded coarsest first
            self.stages.append(nn.Sequential(_conv_block(width, _rounded(c)), _conv_block(_rounded(c), _rounded(c))))
            self.heads.append(nn.Conv2d(_rounded(c), c, 1))
            width = _rounded(c)

    def forward(self, teacher: list[torch.Tensor]) -> list[torch.Tensor]:
        pooled = torch.cat([_pool(level, size, self.sizes[-1]) for level, size in zip(teacher, self.sizes)], dim=1)
        x = self.squeeze(self.fuse(pooled))
        predictions = []
        for stage, head, size in zip(self.stages, self.heads, reversed(self.sizes)):
            x = stage(F.interpolate(x, size=size, mode="bilinear"))
            predictions.append(head(x))
        return predictions[::-1]


def _pool(level: torch.Tensor, size: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Average-pool a level of `size` to `target`. Where the sizes divide, as avg_pool2d over the whole
    ratio: the same numbers as adaptive_avg_pool2d (bit for bit), and a graph that exports to ONNX
    when the level's size is known only at run time (timm's tf_ backbones pad "same" dynamically)."""
    if size[0] % target[0] or size[1] % target[1]:
        return F.adaptive_avg_pool2d(level, target)
    kernel = (size[0] // target[0], size[1] // target[1])
    return level if kernel == (1, 1) else F.avg_pool2d(level, kernel)


def _conv_block(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(GROUPS, outputs), nn.ReLU(inplace=True))


def _rounded(channels: float) -> int:
    """A width divisible into GROUPS groups."""
    return GROUPS * max(1, math.ceil(channels / GROUPS))


def _distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """1 - cosine similarity over channels at each position, per level: [B, h, w] each."""
    return [1 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]
