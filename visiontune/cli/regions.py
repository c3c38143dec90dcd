"""`visiontune regions`: a thin layer over visiontune.detect.regions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def regions(
    images: Annotated[Path, typer.Argument(help="The folder of annotated images.")],
    boxes: Annotated[Path, Opt(help="Annotations: a COCO .json file, or a folder of VOC .xml, YOLO .txt or masks.")],
    out: Annotated[Path, Opt(help="Output folder: crops/<class or background>/, regions.csv, regions.json.")],
    format: Annotated[str, Opt("--format", help="auto | coco | voc | yolo | masks")] = "auto",
    iou_pos: Annotated[float, Opt(help="A proposal overlapping a true box this much is that box's class.")] = 0.5,
    iou_neg: Annotated[float, Opt(help="A proposal overlapping every true box less than this is background.")] = 0.3,
    max_negatives: Annotated[int, Opt(help="Background regions kept per image, the highest IoU first.")] = 32,
    proposals: Annotated[str, Opt(help="fast | quality (selective search) | sliding (windows)")] = "fast",
    max_proposals: Annotated[int, Opt(help="Proposals per image.")] = 2000,
    search_side: Annotated[int, Opt(help="Selective search runs on the image scaled to this longer side "
                                         "(its time grows with the area).")] = 512,
    size: Annotated[int, Opt(help="Crop side in pixels (warped, aspect not kept).")] = 224,
    context: Annotated[int, Opt(help="Pixels of surroundings on each side of the warped box.")] = 16,
    val_fraction: Annotated[float, Opt(help="Share of the images in val.")] = 0.2,
    test_fraction: Annotated[float, Opt(help="Share of the images in test.")] = 0.2,
    seed: Annotated[int, Opt(help="Seed of the split by image.")] = 0,
) -> None:
    """Label region proposals by IoU with the annotated boxes and write them as crops and a CSV that
    `visiontune train OUT/regions.csv` fine-tunes a classifier on (split by source image)."""
    from visiontune.detect.regions import regions as write

    summary = write(images, boxes, out, format, iou_pos=iou_pos, iou_neg=iou_neg, max_negatives=max_negatives,
                    proposals=proposals, max_proposals=max_proposals, search_side=search_side, size=size, context=context,
                    val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    for row in summary["skipped"]:
        err.print(f"skipped {row['path']}: {row['reason']}", markup=False)
    problems = summary["annotation_problems"]
    for row in problems[:20]:
        err.print(f"annotation dropped: {row['source']}: {row['reason']}", markup=False)
    if len(problems) > 20:
        err.print(f"... and {len(problems) - 20} more dropped annotations (see regions.json)", markup=False)
    for split, counts in summary["regions_per_split"].items():
        listed = ", ".join(f"{label} {n}" for label, n in counts.items()) or "none"
        stdout.print(f"{split}: {summary['images_per_split'][split]} images, regions: {listed}", markup=False)
    recall = ", ".join(f"{name} {share:.1%}" for name, share in summary["proposal_recall"].items())
    if recall:
        stdout.print(f"proposals: {summary['mean_proposals']:g} per image; true boxes they reach at IoU >= "
                     f"{summary['options']['iou_pos']:g}: {recall}", markup=False)
    for note in summary["notes"]:
        stdout.print(f"note: {note}", markup=False)
    stdout.print(f"{summary['regions']} regions of {summary['images']} images in {summary['seconds']:.1f} s; "
                 f"train on them with: visiontune train {summary['csv']}", markup=False)
