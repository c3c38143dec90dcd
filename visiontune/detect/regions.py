"""`visiontune regions`: an annotated image set turned into labelled region crops that
`visiontune train DIR/regions.csv` fine-tunes a classifier on (the R-CNN recipe's first stage).

Each image's proposals are labelled by IoU with its true boxes (`labelling.label_proposals`) and
cut out with context (`labelling.crop_region`) into `DIR/crops/<class or background>/`. The
split is drawn over source images, so crops of one image never land in two splits, and written
into the CSV's `split` column, which `train` keeps as given. Images are processed one at a time:
memory does not grow with the number of images or crops. The CSV is written last, atomically:
crops that an interrupted run left behind are never listed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from visiontune.config import DEFAULT_MAX_PIXELS
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.splits import SPLITS
from visiontune.detect.annotations import load_annotations, split_detection_set
from visiontune.detect.labelling import (
    BACKGROUND,
    BACKGROUND_LABEL,
    crop_region,
    label_proposals,
    reached,
)
from visiontune.detect.proposals import MIN_SEARCH_SIDE, MODES, SEARCH_SIDE, ProposalCache
from visiontune.detect.types import ImageTargets
from visiontune.errors import UserError
from visiontune.io import write_csv_atomic, write_text_atomic

REGIONS_CSV = "regions.csv"
REGIONS_SUMMARY = "regions.json"
CROPS_DIR = "crops"
PROPOSALS_DIR = "proposals"
CSV_COLUMNS = ["path", "label", "iou", "image", "box", "split"]


def regions(images: str | Path, boxes: str | Path, out: str | Path, fmt: str = "auto", *, iou_pos: float = 0.5,
            iou_neg: float = 0.3, max_negatives: int = 32, proposals: str = "fast", max_proposals: int = 2000,
            search_side: int = SEARCH_SIDE, size: int = 224, context: int = 16, val_fraction: float = 0.2, test_fraction: float = 0.2,
            seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> dict:
    """Parse the annotations `boxes` of the images under `images`, split them by image and write
    the region crops and `regions.csv` under `out`; returns the summary (also `regions.json`)."""
    dataset = load_annotations(Path(boxes), Path(images), fmt)
    splits = split_detection_set(dataset, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    summary = write_regions(splits, dataset.classes, out, iou_pos=iou_pos, iou_neg=iou_neg,
                            max_negatives=max_negatives, proposals=proposals, max_proposals=max_proposals,
                            search_side=search_side, size=size, context=context, max_pixels=max_pixels, progress=progress)
    summary["annotation_problems"] = [{"source": p.source, "reason": p.reason} for p in dataset.problems]
    summary["split_seed"] = seed
    write_text_atomic(Path(out) / REGIONS_SUMMARY, _json(summary))
    return summary


def write_regions(splits: dict[str, list[ImageTargets]], classes: list[str], out: str | Path, *,
                  iou_pos: float = 0.5, iou_neg: float = 0.3, max_negatives: int = 32, proposals: str = "fast",
                  max_proposals: int = 2000, search_side: int = SEARCH_SIDE, size: int = 224, context: int = 16,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> dict:
    """The crops and `regions.csv` of images already split (`split name -> images`)."""
    started = time.perf_counter()
    if BACKGROUND in classes:
        raise UserError(f"'{BACKGROUND}' is the name of the negative regions; rename that annotation class")
    check_region_options(iou_pos, iou_neg, max_negatives, proposals, max_proposals, size, context, search_side)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split name(s): {', '.join(unknown)}")
    out = Path(out).expanduser()
    cache = ProposalCache(out / PROPOSALS_DIR, proposals, max_proposals, search_side)
    names = [*classes]
    rows: list[list] = []
    skipped: list[dict] = []
    stems: Counter[str] = Counter()
    boxes_reached: Counter[str] = Counter()
    boxes_total: Counter[str] = Counter()
    proposals_seen = 0
    todo = [(split, targets) for split in SPLITS for targets in splits.get(split, [])]
    columns = (TextColumn("regions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("regions", total=len(todo))
        for split, targets in todo:
            try:
                picture = load_rgb(targets.path, max_pixels)
            except ImageLoadError as exc:
                skipped.append({"path": str(targets.path), "reason": str(exc)})
                bar.advance(task)
                continue
            image = np.asarray(picture)
            stem = _unique_stem(Path(targets.path).stem, stems)
            proposed = cache.proposals(targets.path, image)
            proposals_seen += len(proposed)
            for label, hit in zip(targets.labels, reached(proposed, targets, iou_pos)):
                boxes_total[names[label]] += 1
                boxes_reached[names[label]] += int(hit)
            labelled = label_proposals(proposed, targets, iou_pos, iou_neg, max_negatives)
            fill = tuple(round(v) for v in image.reshape(-1, 3).mean(axis=0))
            for i, (box, label, iou) in enumerate(zip(labelled.boxes, labelled.labels, labelled.iou)):
                name = BACKGROUND if label == BACKGROUND_LABEL else names[label]
                relative = Path(CROPS_DIR) / name / f"{stem}_{i}.png"
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop_region(picture, box, size, context, fill)).save(out / relative)
                rows.append([relative.as_posix(), name, f"{iou:.4f}", str(targets.path),
                             " ".join(f"{v:.1f}" for v in box), split])
            bar.advance(task)
    if not rows:
        raise UserError("no region was written: none of the images could be read" if skipped
                        else "no region was written: no image was given")
    write_csv_atomic(out / REGIONS_CSV, CSV_COLUMNS, rows)
    counts = {split: dict(sorted(Counter(r[1] for r in rows if r[5] == split).items())) for split in SPLITS}
    notes = [f"{split} has no regions of {', '.join(missing)}: `visiontune train` needs every class in train and "
             "val; use more images, another --seed or larger fractions"
             for split in ("train", "val") if (missing := [c for c in [*classes, BACKGROUND] if c not in counts[split]])]
    summary = {
        "csv": str(out / REGIONS_CSV), "classes": classes, "images": len(todo) - len(skipped),
        "images_per_split": {split: len({r[3] for r in rows if r[5] == split}) for split in SPLITS},
        "regions": len(rows), "regions_per_split": counts, "skipped": skipped, "notes": notes,
        "options": {"iou_pos": iou_pos, "iou_neg": iou_neg, "max_negatives": max_negatives, "proposals": proposals,
                    "max_proposals": max_proposals, "search_side": search_side, "size": size, "context": context},
        "proposal_cache": {"hits": cache.hits, "misses": cache.misses},
        # the share of true boxes some proposal overlaps by iou_pos: the most any detector on them can find
        "proposal_recall": {name: boxes_reached[name] / boxes_total[name] for name in classes if boxes_total[name]},
        "mean_proposals": round(proposals_seen / max(1, len(todo) - len(skipped)), 1),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_text_atomic(out / REGIONS_SUMMARY, _json(summary))
    return summary


def check_region_options(iou_pos: float, iou_neg: float, max_negatives: int, proposals: str, max_proposals: int,
                         size: int, context: int, search_side: int = SEARCH_SIDE) -> None:
    """One message for an option that cannot work, before any image is read."""
    if not 0 <= iou_neg <= iou_pos <= 1:
        raise UserError(f"need 0 <= --iou-neg <= --iou-pos <= 1 (got {iou_neg} and {iou_pos})")
    if max_negatives < 0 or max_proposals < 1:
        raise UserError("--max-negatives must be 0 or more and --max-proposals 1 or more")
    if search_side < MIN_SEARCH_SIDE:
        raise UserError(f"--search-side must be at least {MIN_SEARCH_SIDE} pixels (got {search_side})")
    if proposals not in MODES:
        raise UserError(f"--proposals must be one of {', '.join(MODES)}, not {proposals!r}")
    if size < 8 or not 0 <= 2 * context < size:
        raise UserError(f"--size {size} with --context {context}: the size must be at least 8 and more than "
                        "twice the context")


def _unique_stem(stem: str, seen: Counter[str]) -> str:
    """The image's file stem, numbered from its second occurrence (same names in two folders)."""
    seen[stem] += 1
    return stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"


def _json(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"
