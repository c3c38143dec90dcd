"""Region proposals for the R-CNN pipeline: selective search (OpenCV contrib) or sliding windows,
and a per-image cache so that re-running `regions` or fitting R-CNN twice searches each image once.

Selective search lives in `opencv-contrib-python-headless` (the `[detect]` extra). It installs the
same `cv2` module as `opencv-python-headless`, which `grad-cam` pulls in: whichever pip installed
last owns `cv2/cv2.abi3.so`, and uninstalling either one deletes the files of both. So the
contrib build is checked at run time (by the function itself: a stale `cv2/ximgproc/` stub folder
can make `cv2.ximgproc` exist without it) and its absence is one message with the fix.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np

from visiontune.errors import UserError
from visiontune.io import atomic_write

MODES = ("fast", "quality", "sliding")
SELECTIVE_SEARCH_FIX = (
    "pip uninstall -y opencv-python-headless opencv-contrib-python-headless && "
    "pip install opencv-contrib-python-headless"
)
MIN_SIDE = 8.0  # proposals narrower or lower than this (pixels) carry too little to classify
SEARCH_SIDE = 512  # selective search runs with the longer side at most this (its time grows with area)
MIN_SEARCH_SIDE = 32  # below this, selective search sees too few pixels to segment
CACHE_VERSION = 1  # bump when the proposals for the same image and options change
WINDOW_FRACTIONS = (1.0, 0.5, 0.25, 0.125)  # sliding-window sides, as shares of the shorter image side
WINDOW_ASPECTS = (0.5, 1.0, 2.0)  # width / height
WINDOW_OVERLAP = 0.5  # the stride is this share of the window side


def selective_search_available() -> bool:
    """Whether `cv2` is the contrib build that has selective search."""
    try:
        return hasattr(cv2.ximgproc.segmentation, "createSelectiveSearchSegmentation")
    except AttributeError:
        return False


def propose(image: np.ndarray, mode: str = "fast", max_proposals: int = 2000, *, min_side: float = MIN_SIDE,
            search_side: int = SEARCH_SIDE) -> np.ndarray:
    """Candidate boxes of an RGB uint8 `H x W x 3` image: float32 `[N, 4]` xyxy pixels, N <= max_proposals,
    without duplicates (after rounding to whole pixels) or boxes with a side under `min_side`.

    fast / quality are selective search's two strategies, run on the image scaled down so that
    its longer side is at most `search_side` (boxes scaled back), in selective search's own order
    (coarse merged regions last); sliding is a multi-scale, multi-aspect grid of windows.
    """
    if mode not in MODES:
        raise UserError(f"proposals must be one of {', '.join(MODES)}, not {mode!r}")
    if max_proposals < 1:
        raise UserError(f"max_proposals must be at least 1 (got {max_proposals})")
    if search_side < MIN_SEARCH_SIDE:
        raise UserError(f"the selective-search side must be at least {MIN_SEARCH_SIDE} pixels (got {search_side})")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 H x W x 3 array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if mode == "sliding":
        groups = [_clean(group, width, height, min_side) for group in window_groups(width, height)]
        return _clean(_spread(groups, max_proposals), width, height, min_side)
    return _clean(_selective_search(image, mode, search_side), width, height, min_side)[:max_proposals]


def window_groups(width: int, height: int, fractions=WINDOW_FRACTIONS, aspects=WINDOW_ASPECTS,
                  overlap: float = WINDOW_OVERLAP) -> list[np.ndarray]:
    """Sliding windows, one group per side (a share of the shorter image side) and aspect ratio,
    each tiled with the given overlap and centred; largest windows first."""
    short = min(width, height)
    groups = []
    for fraction in fractions:
        for aspect in aspects:
            w = min(width, short * fraction * math.sqrt(aspect))
            h = min(height, short * fraction / math.sqrt(aspect))
            groups.append(_tile(width, height, w, h, overlap).astype(np.float32))
    return groups


def _spread(groups: list[np.ndarray], limit: int) -> np.ndarray:
    """At most `limit` windows, every group keeping a share in proportion to its size (at least one
    where the limit allows), evenly spaced over the grid."""
    sizes = np.array([len(g) for g in groups])
    if sizes.sum() <= limit:
        return np.concatenate(groups)
    quotas = np.minimum(sizes, np.maximum(1, np.floor(sizes * limit / sizes.sum()).astype(int)))
    while quotas.sum() > limit:  # the minimum of one each overshot: take from the largest shares
        quotas[np.argmax(quotas)] -= 1
    picked = [g[np.linspace(0, len(g) - 1, q).round().astype(int)] for g, q in zip(groups, quotas) if q > 0]
    return np.concatenate(picked)


def _tile(width: int, height: int, w: float, h: float, overlap: float) -> np.ndarray:
    def starts(extent: float, side: float) -> np.ndarray:
        stride = max(1.0, side * (1 - overlap))
        count = math.floor((extent - side) / stride) + 1
        offset = (extent - side - (count - 1) * stride) / 2
        return offset + stride * np.arange(count)

    xs, ys = np.meshgrid(starts(width, w), starts(height, h))
    x1, y1 = xs.ravel(), ys.ravel()
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def _selective_search(image: np.ndarray, mode: str, search_side: int) -> np.ndarray:
    if not selective_search_available():
        raise UserError(
            f"proposals '{mode}' (selective search) needs OpenCV's contrib build, and the installed cv2 lacks "
            f"it (opencv-python-headless installed over it?); fix with: {SELECTIVE_SEARCH_FIX}; "
            "or use proposals 'sliding'"
        )
    height, width = image.shape[:2]
    scale = min(1.0, search_side / max(height, width))
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h
    sx, sy = width / bgr.shape[1], height / bgr.shape[0]
    return np.stack([rects[:, 0] * sx, rects[:, 1] * sy, (rects[:, 0] + rects[:, 2]) * sx,
                     (rects[:, 1] + rects[:, 3]) * sy], axis=1)


def _clean(boxes: np.ndarray, width: int, height: int, min_side: float) -> np.ndarray:
    """Clip to the image, round to whole pixels, drop small boxes and repeats (the first kept)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    boxes = np.round(np.clip(boxes, 0, [width, height, width, height]))
    big = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    boxes = boxes[big]
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)].astype(np.float32)


class ProposalCache:
    """Proposals of image files in a folder of `.npy` files, keyed by the file's bytes (so a renamed
    image is a hit and an edited one a miss), the mode, the search side and the maximum. Each file
    is written whole or not at all; a damaged one is recomputed."""

    def __init__(self, folder: str | Path, mode: str = "fast", max_proposals: int = 2000,
                 search_side: int = SEARCH_SIDE) -> None:
        self.folder = Path(folder)
        self.mode = mode
        self.max_proposals = max_proposals
        self.search_side = search_side
        self.hits = 0
        self.misses = 0

    def path_for(self, image_path: str | Path) -> Path:
        digest = hashlib.sha1(Path(image_path).read_bytes()).hexdigest()
        searched = "" if self.mode == "sliding" else f"-s{self.search_side}"  # windows ignore the search side
        name = f"{digest}-{self.mode}{searched}-{self.max_proposals}-v{CACHE_VERSION}.npy"
        return self.folder / name[:2] / name

    def proposals(self, image_path: str | Path, image: np.ndarray) -> np.ndarray:
        """The cached proposals of `image_path` (whose decoded pixels are `image`), computed once."""
        path = self.path_for(image_path)
        if path.is_file():
            try:
                boxes = np.load(path, allow_pickle=False)
                if boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4:
                    self.hits += 1
                    return boxes
            except (OSError, ValueError):
                pass  # damaged: recomputed and rewritten below
        boxes = propose(image, self.mode, self.max_proposals, search_side=self.search_side)
        atomic_write(path, lambda tmp: _save_npy(tmp, boxes))
        self.misses += 1
        return boxes


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.save would append .npy to the temporary name
        np.save(handle, array, allow_pickle=False)
