"""visiontune's PatchCore and PaDiM against anomalib 2.7 on the same data, backbone, layers, image
size and coreset ratio, in one run; plus the fit time and peak memory of a larger PatchCore fit.

    python benchmarks/anomaly_vs_anomalib.py [--shared ../shared] [--out runs/bench-anomaly]

The data are synthetic (no MVTec AD here: only package registries are reachable): grainy, unevenly
lit 512 px textures; defects are drawn scratches, their masks come from the same drawing, softened
at the edges like real masks. anomalib runs in its own venv (created at --anomalib-venv when
missing: `pip install anomalib==2.7.*`, sharing this venv's torch and timm through a .pth file, so
both tools run the same torch build). Each tool and method runs in its own subprocess, which
reports its fit time, its inference images/s over the test images and its peak RSS; both tools'
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
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]
ANOMALIB_SPEC = "anomalib==2.7.*"


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


def peak_rss_gib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20  # ru_maxrss is in KiB on Linux


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
        out=out, device="cpu",
    )
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_timings": model.fit_info_["timings"], "fit_rss_gib": peak_rss_gib()}
    if args.fit_only:
        return result
    paths = test_paths(Path(args.data))
    rates = []
    for _ in range(2):  # the first pass includes loader start-up and first-batch latency
        started = time.perf_counter()
        scored = model.score(paths)
        rates.append(len(paths) / (time.perf_counter() - started))
    np.save(out / "maps.npy", scored.maps)
    return result | {"predict_images_per_s": rates, "paths": [str(p) for p in scored.paths],
                     "scores": scored.scores.tolist(), "maps": str(out / "maps.npy"), "peak_rss_gib": peak_rss_gib()}


def anomalib_worker(args: argparse.Namespace) -> dict:
    import timm
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    out = Path(args.out) / f"anomalib-{args.method}"
    shutil.rmtree(out, ignore_errors=True)
    pre = PreProcessor(transform=v2.Compose([v2.Resize((args.size, args.size), antialias=True),
                                             v2.Normalize([0.5] * 3, [0.5] * 3)]))
    common = dict(backbone=BACKBONE, layers=LAYERS, pre_trained=False, pre_processor=pre,
                  post_processor=PostProcessor(enable_normalization=False), evaluator=False, visualizer=False)
    if args.method == "patchcore":
        model = Patchcore(coreset_sampling_ratio=args.coreset_ratio, **common)
    else:
        model = Padim(n_features=100, **common)
    # anomalib asks timm for the hub weights (unreachable here): load the same file instead.
    extractor = model.model.feature_extractor.feature_extractor
    reference = timm.create_model(BACKBONE, features_only=True, exportable=True, out_indices=[2, 3],
                                  pretrained=True, pretrained_cfg_overlay={"file": args.weights})
    extractor.load_state_dict(reference.state_dict())
    data = Path(args.data)
    datamodule = MVTecAD(root=data.parent, category=data.name, train_batch_size=32, eval_batch_size=32,
                         num_workers=1, val_split_mode="from_train", val_split_ratio=0.1, seed=0)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(out),
                    enable_progress_bar=False)
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_rss_gib": peak_rss_gib()}
    datamodule.setup()
    loader = datamodule.test_dataloader()
    rates = []
    for _ in range(2):  # as for visiontune: a first and a second pass
        started = time.perf_counter()
        batches = engine.predict(model=model, dataloaders=loader)
        rates.append(len(loader.dataset) / (time.perf_counter() - started))
    paths = [p for batch in batches for p in batch.image_path]
    scores = torch.cat([batch.pred_score.flatten() for batch in batches])
    maps = torch.cat([batch.anomaly_map.reshape(len(batch.image_path), args.size, args.size) for batch in batches])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "maps.npy", maps.float().numpy())
    return result | {"predict_images_per_s": rates, "paths": paths, "scores": scores.tolist(),
                     "maps": str(out / "maps.npy"), "peak_rss_gib": peak_rss_gib()}


# ---------------------------------------------------------------- orchestration


def ensure_anomalib_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import anomalib"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "zz_shared_torch.pth").write_text(f"{site}\n")
    subprocess.run([python, "-m", "pip", "install", "-q", ANOMALIB_SPEC], check=True)
    return python


def run_worker(python: Path, tool: str, method: str, args: argparse.Namespace, data: Path, fit_only: bool = False,
               timeout: float | None = None) -> dict:
    command = [str(python), __file__, "--worker", tool, "--method", method, "--data", str(data), "--out", args.out,
               "--weights", args.weights, "--size", str(args.size), "--coreset-ratio", str(args.coreset_ratio)]
    if fit_only:
        command.append("--fit-only")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail), "wall_s": wall}
    return json.loads(lines[-1].removeprefix("RESULT ")) | {"wall_s": wall}


def accuracy(result: dict, size: int, data: Path) -> dict:
    """Image and pixel AUROC from a worker's raw scores and maps, against the same masks."""
    from sklearn.metrics import roc_auc_score

    from visiontune.anomaly.data import load_mask
    from visiontune.anomaly.metrics import aupro

    paths = [Path(p) for p in result["paths"]]
    labels = np.array([p.parent.name != "good" for p in paths])
    maps = np.load(result["maps"])
    masks = np.stack([
        load_mask(data / "ground_truth" / "scratch" / f"{p.stem}_mask.png", size, 10**9) if label
        else np.zeros((size, size), bool) for p, label in zip(paths, labels)
    ])
    return {"image_auroc": roc_auc_score(labels, result["scores"]),
            "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()), "aupro": aupro(maps, masks)}


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
    args = parser.parse_args()

    if args.worker:
        worker = visiontune_worker if args.worker == "visiontune" else anomalib_worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
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
            result = run_worker(python, tool, method, args, data, timeout=args.anomalib_timeout)
            if "error" not in result:
                result |= accuracy(result, args.size, data)
                for key in ("paths", "scores", "maps"):
                    result.pop(key)
            report["runs"][f"{tool}-{method}"] = result
            print(json.dumps(result), flush=True)
    if args.scale_train:
        print(f"running visiontune patchcore on {args.scale_train} images (fit only) ...", flush=True)
        scale_data = make_dataset(out / "data" / "scale", args.scale_train, 2, args.px, seed=1)
        report["runs"][f"visiontune-patchcore-fit-{args.scale_train}"] = run_worker(
            Path(sys.executable), "visiontune", "patchcore", args, scale_data, fit_only=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
