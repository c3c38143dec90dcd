"""Proposal speed and the cost of `visiontune regions` on generated crack tiles.

Writes N tiles of SIZE px (visiontune.detect.synthetic.make_tiles), times `propose` per mode on
the first 20, then runs `regions` (selective search fast, 2000 proposals, 224-px crops) over all
of them in a fresh subprocess whose wall time and peak resident memory are measured.

    PYTHONPATH=. python benchmarks/regions_proposals.py --images 50 --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.detect.proposals import propose
from visiontune.detect.synthetic import make_tiles

RESULT = Path(__file__).parent / "results" / "regions_proposals_cpu.json"
TIMED_IMAGES = 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="regions-bench-"))
    annotations = make_tiles(root / "tiles", args.images, size=args.size, seed=0)
    paths = sorted((root / "tiles" / "images").glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:TIMED_IMAGES]]
    speed = {}
    for mode in ("fast", "sliding", "quality"):
        timed = images if mode != "quality" else images[:5]
        started = time.perf_counter()
        counts = [len(propose(image, mode, 2000)) for image in timed]
        seconds = time.perf_counter() - started
        speed[mode] = {"images": len(timed), "images_per_s": round(len(timed) / seconds, 3),
                       "mean_proposals": round(float(np.mean(counts)), 1)}
        print(mode, speed[mode], flush=True)
    command = [sys.executable, "-m", "visiontune.cli.main", "regions", str(root / "tiles" / "images"),
               "--boxes", str(annotations), "--out", str(root / "regions"), "--proposals", "fast",
               "--max-proposals", "2000", "--size", "224"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    summary = json.loads((root / "regions" / "regions.json").read_text())
    result = {
        "machine": "2-core AMD EPYC, no GPU, cores shared with other work (timings under contention)",
        "images": args.images, "size": args.size, "proposal_speed": speed,
        "regions": {"command": "visiontune regions IMAGES --boxes annotations.json --out OUT --proposals fast "
                               "--max-proposals 2000 --size 224",
                    "wall_s": round(wall, 1), "peak_rss_mib": round(peak_mib), "regions": summary["regions"],
                    "regions_per_split": summary["regions_per_split"],
                    "crops_mib": round(sum(p.stat().st_size for p in (root / "regions" / "crops").rglob("*.png")) / 2**20, 1)},
        "stdout": done.stdout.strip().splitlines()[-6:],
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
