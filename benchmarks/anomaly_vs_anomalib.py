"""visiontune's PatchCore and PaDiM against anomalib 2.7 on the same data, backbone, layers, image
size and coreset ratio, in one run; plus the fit time and peak memory of a larger PatchCore fit.

    python benchmarks/anomaly_vs_anomalib.py [--shared ../shared] [--out runs/bench-anomaly]

The data are synthetic (no MVTec AD here: only package registries are reachable): grainy, unevenly
lit 512 px textures; defects are drawn scratches, their masks come from the same drawing, softened
at the edges like real masks. anomalib runs in its own venv (created at --anomalib-venv when
missing: `pip install anomalib==2.7.*`, sharing this venv's torch and timm through a .pth file, so
both tools run the same torch build). Each tool and method runs in its own subprocess, which
reports its fit time, its inference images/s over the test images and its peak RSS (visiontune's
twice: the fitted model in eager torch, and the saved model loaded as `anomaly predict` loads it,
scoring through its ONNX graph; the accuracy is that of the loaded model); both tools'
image and pixel AUROC are computed here by the same code from their raw scores and maps
(anomalib's normalisation is switched off; the masks are binarised by visiontune's rule).
Settings shared by both: tf_efficientnet_lite0 with the weights in ../shared, layers
blocks.2 + blocks.4, 256 px (resize, no crop), mean = std = 0.5 (the weights' own config), 1%
coreset, PaDiM with 100 random channels, 10% of the good training images held out for
calibration, batch size 32, one loader worker, torch's default 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_common import (
    BACKBONE,
    LAYERS,
    accuracy,
    anomalib_model,
    anomalib_predict,
    ensure_anomalib_venv,
    peak_rss_gib,
    run_worker,
    visiontune_scores,
)

# ---------------------------------------------------------------- data


def make_dataset(root: Path, n_train: int, n_test: int, px: int, seed: int) -> Path:
    """MVTec AD layout: train/good, test/good, test/scratch, ground_truth/scratch/<name>_mask.png."""
    from PIL import Image, ImageDraw, ImageFilter

    if (root / "done").is_file() and json.loads((root / "done").read_text()) == [n_train, n_test, px, seed]:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)

    def texture() -> Image.Image:
        base = rng.uniform(110, 150)
        gradient = np.linspace(-1, 1, px)[None, :] * rng.uniform(-15, 15)
        low = Image.fromarray(rng.normal(0, 12, (8, 8)).astype(np.float32), mode="F").resize((px, px), Image.BICUBIC)
        grain = Image.fromarray(rng.normal(0, 10, (px // 2, px // 2)).astype(np.float32), mode="F").resize((px, px))
        grey = np.clip(base + gradient + np.asarray(low) + np.asarray(grain), 0, 255).astype(np.uint8)
        return Image.merge("RGB", [Image.fromarray(grey, mode="L").filter(ImageFilter.GaussianBlur(1.0))] * 3)

    def scratch(image: Image.Image) -> Image.Image:
        """Faint scratches: 15-35 grey levels off the local surface, 2-4 px wide at 512 px; the mask
        is 4 px wider, then blurred, so it stays non-empty when binarised at half scale."""
        mask = Image.new("L", image.size, 0)
        surface = np.asarray(image)[..., 0].astype(float)
        draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
        for _ in range(rng.integers(1, 3)):
            x0, y0 = rng.uniform(0.1, 0.9, 2) * px
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4) * px
            end = (x0 + np.cos(angle) * length, y0 + np.sin(angle) * length)
            local = surface[int(min(y0, px - 1)), int(min(x0, px - 1))]
            level = int(np.clip(local + rng.choice([-1, 1]) * rng.uniform(15, 35), 0, 255))
            width = int(rng.integers(2, 5))
            draw.line([(x0, y0), end], fill=(level,) * 3, width=width)
            draw_mask.line([(x0, y0), end], fill=255, width=width + 4)
        return mask.filter(ImageFilter.GaussianBlur(1.5))  # soft edges, like real masks

    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        texture().save(root / "train/good" / f"{i:04d}.png")
    for i in range(n_test):
        texture().save(root / "test/good" / f"{i:04d}.png")
        image = texture()
        mask = scratch(image)
        image.save(root / "test/scratch" / f"{i:04d}.png")
        mask.save(root / "ground_truth/scratch" / f"{i:04d}_mask.png")
    (root / "done").write_text(json.dumps([n_train, n_test, px, seed]))
    return root


# ---------------------------------------------------------------- workers (run in subprocesses)


def test_paths(root: Path) -> list[Path]:
    return sorted((root / "test" / "good").glob("*.png")) + sorted((root / "test" / "scratch").glob("*.png"))


def visiontune_worker(args: argparse.Namespace) -> dict:
    from visiontune import anomaly

    out = Path(args.out) / f"visiontune-{args.method}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    model = anomaly.fit(
        args.data, method=args.method, backbone=BACKBONE, layers=LAYERS, image_size=args.size,
        coreset_ratio=args.coreset_ratio, n_features=100, weights=args.weights, batch_size=32, workers=1,
        out=out, device="cpu", seed=args.fit_seed,
    )
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_timings": model.fit_info_["timings"], "fit_rss_gib": peak_rss_gib()}
    if args.fit_only:
        return result
    paths = test_paths(Path(args.data))
    eager = visiontune_scores(model, paths, out, "eager_images_per_s")  # the fitted model: eager torch
    started = time.perf_counter()
    loaded = anomaly.load(out, device="cpu", batch_size=32)  # as `anomaly predict` loads it: ONNX Runtime
    backend = getattr(loaded, "backend", "torch")  # code from before the ONNX backend (PYTHONPATH at a checkout)
    result |= {"load_s": time.perf_counter() - started, "backend": backend, "workers": loaded.workers,
               "eager_images_per_s": eager["eager_images_per_s"]}
    scored = visiontune_scores(loaded, paths, out, "predict_images_per_s")
    result["max_abs_score_diff_vs_eager"] = float(np.abs(np.array(scored["scores"]) - eager["scores"]).max())
    return result | scored


def anomalib_worker(args: argparse.Namespace) -> dict:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    out = Path(args.out) / f"anomalib-{args.method}"
    shutil.rmtree(out, ignore_errors=True)
    model = anomalib_model(args.method, args.size, args.coreset_ratio, args.weights)
    data = Path(args.data)
    datamodule = MVTecAD(root=data.parent, category=data.name, train_batch_size=32, eval_batch_size=32,
                         num_workers=1, val_split_mode="from_train", val_split_ratio=0.1, seed=args.fit_seed)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(out),
                    enable_progress_bar=False)
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_rss_gib": peak_rss_gib()}
    datamodule.setup()
    predicted = anomalib_predict(engine, model, datamodule.test_dataloader(), args.size)  # two passes, as above
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "maps.npy", predicted["maps"])
    return result | {"predict_images_per_s": predicted["predict_images_per_s"], "paths": predicted["paths"],
                     "scores": predicted["scores"].tolist(), "maps": str(out / "maps.npy"),
                     "peak_rss_gib": peak_rss_gib()}


# ---------------------------------------------------------------- orchestration


def worker(python: Path, tool: str, method: str, args: argparse.Namespace, data: Path, fit_only: bool = False,
           timeout: float | None = None) -> dict:
    command = ["--worker", tool, "--method", method, "--data", str(data), "--out", args.out,
               "--weights", args.weights, "--size", str(args.size), "--coreset-ratio", str(args.coreset_ratio),
               "--fit-seed", str(args.fit_seed)]
    return run_worker(python, __file__, command + (["--fit-only"] if fit_only else []), timeout)


def scores_accuracy(result: dict, size: int, data: Path) -> dict:
    """Image and pixel AUROC and AUPRO from a worker's raw scores and maps, against the same masks."""
    truth = {p: ("good", None) if Path(p).parent.name == "good"
             else ("scratch", data / "ground_truth" / "scratch" / f"{Path(p).stem}_mask.png") for p in result["paths"]}
    measured = accuracy(result["paths"], result["scores"], np.load(result["maps"]), truth, size)
    return {key: measured[key] for key in ("image_auroc", "pixel_auroc", "aupro")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve()
    parser.add_argument("--shared", default=str(here.parents[1].parent / "shared"))
    parser.add_argument("--out", default="runs/bench-anomaly")
    parser.add_argument("--anomalib-venv", default="/tmp/anomalib-venv")
    parser.add_argument("--train", type=int, default=200, help="good training images of the comparison")
    parser.add_argument("--test", type=int, default=40, help="good and as many scratched test images")
    parser.add_argument("--px", type=int, default=512, help="stored image size")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--scale-train", type=int, default=1000, help="images of the fit-time / memory run; 0 skips")
    parser.add_argument("--methods", default="patchcore,padim")
    parser.add_argument("--anomalib-timeout", type=float, default=1800)
    parser.add_argument("--worker", choices=["visiontune", "anomalib"])
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--data")
    parser.add_argument("--weights")
    parser.add_argument("--fit-only", action="store_true")
    parser.add_argument("--fit-seed", type=int, default=0,
                        help="the fit's seed (hold-out split, coreset start, projection); the data stay seed 0")
    args = parser.parse_args()

    if args.worker:
        run = visiontune_worker if args.worker == "visiontune" else anomalib_worker
        print("RESULT " + json.dumps(run(args)), flush=True)
        return

    args.weights = str(Path(args.shared) / "weights" / f"{BACKBONE}.in1k.safetensors")
    if not Path(args.weights).is_file():
        raise SystemExit(f"needs {args.weights}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_dataset(out / "data" / "scratches", args.train, args.test, args.px, seed=0)
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; shared with other work during the run",
        "settings": {"backbone": BACKBONE, "layers": LAYERS, "image_size": args.size, "coreset_ratio": args.coreset_ratio,
                     "train_images": args.train, "test_images": 2 * args.test, "stored_px": args.px},
        "runs": {},
    }
    try:
        anomalib_python = ensure_anomalib_venv(Path(args.anomalib_venv))
    except (subprocess.CalledProcessError, OSError) as exc:
        anomalib_python = None
        report["anomalib_install_error"] = str(exc)
    for method in args.methods.split(","):
        tools = [("visiontune", Path(sys.executable))] + ([("anomalib", anomalib_python)] if anomalib_python else [])
        for tool, python in tools:
            print(f"running {tool} {method} ...", flush=True)
            result = worker(python, tool, method, args, data, timeout=args.anomalib_timeout)
            if "error" not in result:
                result |= scores_accuracy(result, args.size, data)
                for key in ("paths", "scores", "maps"):
                    result.pop(key)
            report["runs"][f"{tool}-{method}"] = result
            print(json.dumps(result), flush=True)
    if args.scale_train:
        print(f"running visiontune patchcore on {args.scale_train} images (fit only) ...", flush=True)
        scale_data = make_dataset(out / "data" / "scale", args.scale_train, 2, args.px, seed=1)
        report["runs"][f"visiontune-patchcore-fit-{args.scale_train}"] = worker(
            Path(sys.executable), "visiontune", "patchcore", args, scale_data, fit_only=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
