"""Issue #5: the decoded-image cache against decoding every image every epoch.

Per image, on the hymenoptera train folder (245 JPEGs) with tf_efficientnet_lite0's preprocessing
(224 px, bicubic, crop_pct 0.875, so the cache stores the shorter side at 256): decode + float
transform (today's path), a cold cache (decode, resize, write), a warm hit, hit + the uint8
transform, and the normaliser's share per image. One torch thread, as in a DataLoader worker.
Median of repeated passes over all files; prints a markdown table for docs/benchmarks.md.

    python benchmarks/decoded_cache.py [--shared ../shared] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from visiontune.data.cache import DecodedImageCache
from visiontune.data.images import is_image_file, load_rgb
from visiontune.data.transforms import Preprocessing

MAX_PIXELS = 100_000_000


def per_image_ms(files: list[Path], step: Callable[[Path], object], repeats: int, setup: Callable[[], None] = lambda: None) -> float:
    """Median over `repeats` passes (after one warm-up pass) of a pass's time per file."""
    times = []
    for _ in range(repeats + 1):
        setup()
        started = time.perf_counter()
        for path in files:
            step(path)
        times.append((time.perf_counter() - started) / len(files) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    files = sorted(p for p in (Path(args.shared) / "data/hymenoptera/train").rglob("*") if is_image_file(p))
    if not files:
        raise SystemExit(f"no images under {args.shared}/data/hymenoptera/train")
    torch.set_num_threads(1)
    pre = Preprocessing.from_model(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    eval_float, train_float = pre.eval_transform(), pre.train_transform("light")
    eval_u8, train_u8 = pre.eval_transform(normalize=False), pre.train_transform("light", normalize=False)
    normalize = pre.normalizer()
    print("load average before:", os.getloadavg())

    with tempfile.TemporaryDirectory() as scratch:
        cold_root = Path(scratch) / "cold"
        cold = DecodedImageCache.for_preprocessing(pre, root=cold_root)

        def fresh_cold_cache() -> None:
            cold.clear()

        rows = {
            "sha1 of the file's bytes (a content key)": per_image_ms(
                files, lambda p: hashlib.sha1(p.read_bytes()).digest(), args.repeats),
            "load_rgb (decode only)": per_image_ms(files, lambda p: load_rgb(p, MAX_PIXELS), args.repeats),
            "load_rgb + float eval transform (before)": per_image_ms(
                files, lambda p: eval_float(load_rgb(p, MAX_PIXELS)), args.repeats),
            "load_rgb + float train transform, light (before)": per_image_ms(
                files, lambda p: train_float(load_rgb(p, MAX_PIXELS)), args.repeats),
            "cold cache: decode + resize + write": per_image_ms(
                files, lambda p: cold.load(p, MAX_PIXELS), args.repeats, setup=fresh_cold_cache),
        }
        warm = DecodedImageCache.for_preprocessing(pre, root=Path(scratch) / "warm")
        for path in files:
            warm.load(path, MAX_PIXELS)
        rows["warm cache hit"] = per_image_ms(files, lambda p: warm.load(p, MAX_PIXELS), args.repeats)
        rows["hit + uint8 eval transform"] = per_image_ms(files, lambda p: eval_u8(warm.load(p, MAX_PIXELS)), args.repeats)
        rows["hit + uint8 train transform, light"] = per_image_ms(
            files, lambda p: train_u8(warm.load(p, MAX_PIXELS)), args.repeats)
        batch = torch.stack([eval_u8(warm.load(p, MAX_PIXELS)) for p in files[:64]])
        rows["normaliser, per image of a 64-image batch (CPU)"] = per_image_ms(
            [batch], normalize, args.repeats * 20) / len(batch)
        cache_bytes, source_bytes = warm.size_on_disk(), sum(p.stat().st_size for p in files)

    load = os.getloadavg()
    print("load average after:", load)
    base_eval, base_train = rows["load_rgb + float eval transform (before)"], rows["load_rgb + float train transform, light (before)"]
    print(f"\n{len(files)} images, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f}\n")
    print("| step | ms / image |\n| --- | --- |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.3f} |")
    norm = rows["normaliser, per image of a 64-image batch (CPU)"]
    hit_eval, hit_train = rows["hit + uint8 eval transform"], rows["hit + uint8 train transform, light"]
    print(f"\nper image in the loader workers: eval {base_eval / hit_eval:.1f}x, train (light) {base_train / hit_train:.1f}x "
          f"faster from the cache; counting the normaliser on the CPU too: {base_eval / (hit_eval + norm):.1f}x "
          f"and {base_train / (hit_train + norm):.1f}x")
    print(f"cache on disk: {cache_bytes / 1e6:.1f} MB for {len(files)} images "
          f"({source_bytes / 1e6:.1f} MB of JPEGs); per batch item: uint8 {3 * pre.input_size**2 / 1e3:.0f} kB "
          f"vs float32 {12 * pre.input_size**2 / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
