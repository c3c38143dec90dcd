"""Selective search's time and box recall against the side it searches at (`--search-side`).

The same generated tiles (visiontune.detect.synthetic.make_tiles, seed 0, 512 px) are searched in
`fast` mode with the longer side scaled to each side in turn, in one process, the sides
interleaved per image so that a change in load hits them alike. Recall: the share of true boxes
that some proposal overlaps at IoU >= 0.5, per class.

    PYTHONPATH=. python benchmarks/proposal_search_side.py [--images 40] [--sides 512,384,256,192,128]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.bench.benchmark import machine
from visiontune.detect.annotations import load_annotations
from visiontune.detect.labelling import reached
from visiontune.detect.proposals import propose
from visiontune.detect.synthetic import make_tiles

RESULT = Path(__file__).parent / "results" / "proposal_search_side_cpu.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--sides", default="512,384,256,192,128")
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    coco = make_tiles(Path(tempfile.mkdtemp(prefix="search-side-")) / "tiles", args.images, size=512, seed=0)
    dataset = load_annotations(coco, coco.parent / "images")
    seconds, counts = Counter(), {side: [] for side in sides}
    found = {side: Counter() for side in sides}
    total = Counter(dataset.classes[label] for targets in dataset.images for label in targets.labels)
    load_before = os.getloadavg()
    for targets in dataset.images:
        pixels = np.asarray(Image.open(targets.path).convert("RGB"))
        for side in sides:
            started = time.perf_counter()
            proposals = propose(pixels, "fast", 2000, search_side=side)
            seconds[side] += time.perf_counter() - started
            counts[side].append(len(proposals))
            for label, hit in zip(targets.labels, reached(proposals, targets)):
                found[side][dataset.classes[label]] += int(hit)
    rows = [{"search_side": side, "seconds_per_image": seconds[side] / args.images,
             "mean_proposals": float(np.mean(counts[side])),
             "recall_at_iou_0.5": {name: found[side][name] / total[name] for name in sorted(total)},
             "recall_all": sum(found[side].values()) / sum(total.values())} for side in sides]
    result = {"machine": machine(), "images": args.images, "tile_size": 512, "boxes": dict(total), "rows": rows,
              "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['search_side']:4d} px  {r['seconds_per_image']:.3f} s/image  {r['mean_proposals']:6.1f} proposals  "
              f"recall {r['recall_all']:.3f} {r['recall_at_iou_0.5']}")


if __name__ == "__main__":
    main()
