"""CPU time of turning patch scores into maps and image scores, per image score rule.

    PYTHONPATH=. python benchmarks/anomaly_scoring_cost.py [--repeats 20] [--threads 1]

`visiontune.anomaly.components.anomaly_map.MapScoring.apply` on a batch of 16 random 32 x 32 patch
score grids (PatchCore's grid for tf_efficientnet_lite0 at 256 px) to 256 px maps, once per rule,
timed over --repeats calls after one warm-up; prints ms per image.
"""

from __future__ import annotations

import argparse
import time

import torch

from visiontune.anomaly.components.anomaly_map import IMAGE_SCORES, MapScoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch_scores = torch.rand(16, 32, 32, generator=torch.Generator().manual_seed(0))
    for rule in IMAGE_SCORES:
        scoring = MapScoring(image_score=rule)
        scoring.apply(patch_scores, None, 256)
        started = time.perf_counter()
        for _ in range(args.repeats):
            scoring.apply(patch_scores, None, 256)
        per_image = (time.perf_counter() - started) / args.repeats / len(patch_scores) * 1000
        print(f"{rule}: {per_image:.2f} ms per image ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
