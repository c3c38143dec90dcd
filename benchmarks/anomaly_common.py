"""What the anomaly benchmarks against anomalib share (anomaly_vs_anomalib.py, anomaly_real.py).

- `ensure_anomalib_venv`: anomalib in a venv of its own, created on demand
  (`pip install anomalib==2.7.*`), seeing this venv's torch and timm through a .pth file, so both
  tools run the same torch build.
- `run_worker`: one tool and method in its own subprocess (the calling script with `--worker`),
  which prints one `RESULT {json}` line.
- `peak_rss_gib`: the peak resident memory of a worker (and its loader processes).
- `anomalib_model`: anomalib's PatchCore / PaDiM set up like visiontune's (same backbone, weights
  file, layers, resize without crop, normalisation; anomalib's own normalisation switched off, so
  its scores and maps are raw).
- `accuracy`: image AUROC, pixel AUROC and AUPRO (visiontune.anomaly.metrics.aupro), and per-type
  image AUROC, computed by the same code for both tools from raw scores and maps, against masks
  binarised by visiontune's rule (visiontune.anomaly.data.load_mask).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]
ANOMALIB_SPEC = "anomalib==2.7.*"
GOOD = "good"


def peak_rss_gib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20  # ru_maxrss is in KiB on Linux


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- anomalib's venv and the workers


def ensure_anomalib_venv(venv: Path, log: Callable[[str], None] = print) -> Path:
    """The venv's python, with anomalib importable; creates the venv when missing."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import anomalib"], capture_output=True, check=False).returncode == 0:
        return python
    log(f"creating {venv} with {ANOMALIB_SPEC} (several minutes) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "zz_shared_torch.pth").write_text(f"{site}\n")
    subprocess.run([python, "-m", "pip", "install", "-q", ANOMALIB_SPEC], check=True)
    return python


def run_worker(python: Path, script: str, worker_args: list[str], timeout: float | None = None,
               stderr_log: Path | None = None) -> dict:
    """`python script --worker ...worker_args` in a subprocess: its RESULT line, plus wall time and
    the load average before and after; {"error": ...} when it fails or runs past `timeout`. Its
    stderr (progress bars, warnings) goes to `stderr_log` when given, to watch a long run."""
    command = [str(python), script, *worker_args]
    load_before = load_average()
    started = time.perf_counter()
    try:
        if stderr_log is None:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
            stderr = done.stderr
        else:
            stderr_log.parent.mkdir(parents=True, exist_ok=True)
            with stderr_log.open("w") as log:
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout,
                                      check=False)
            stderr = stderr_log.read_text(errors="replace")
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s", "load_before": load_before}
    wall = time.perf_counter() - started
    load = {"wall_s": wall, "load_before": load_before, "load_after": load_average()}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (stderr or done.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)} | load
    return json.loads(lines[-1].removeprefix("RESULT ")) | load


# ---------------------------------------------------------------- anomalib, set up like visiontune


def visiontune_scores(model, paths: list[Path], out: Path, rate_key: str) -> dict:
    """Scores and maps of a fitted visiontune model, timed twice (the first pass includes loader
    start-up and first-batch latency); maps go to out/maps.npy for `accuracy`."""
    rates = []
    for _ in range(2):
        started = time.perf_counter()
        scored = model.score(paths)
        rates.append(len(paths) / (time.perf_counter() - started))
    np.save(out / "maps.npy", scored.maps)
    return {rate_key: rates, "paths": [str(p) for p in scored.paths], "scores": scored.scores.tolist(),
            "maps": str(out / "maps.npy"), "peak_rss_gib": peak_rss_gib()}


def anomalib_model(method: str, size: int, coreset_ratio: float, weights: str, n_features: int = 100):
    """anomalib's Patchcore or Padim on BACKBONE / LAYERS with the weights file, raw scores and maps."""
    import timm
    from anomalib.models import Padim, Patchcore
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    pre = PreProcessor(transform=v2.Compose([v2.Resize((size, size), antialias=True),
                                             v2.Normalize([0.5] * 3, [0.5] * 3)]))
    common = {"backbone": BACKBONE, "layers": LAYERS, "pre_trained": False, "pre_processor": pre,
              "post_processor": PostProcessor(enable_normalization=False), "evaluator": False, "visualizer": False}
    if method == "patchcore":
        model = Patchcore(coreset_sampling_ratio=coreset_ratio, **common)
    else:
        model = Padim(n_features=n_features, **common)
    # anomalib asks timm for the hub weights (unreachable here): load the same file instead.
    extractor = model.model.feature_extractor.feature_extractor
    reference = timm.create_model(BACKBONE, features_only=True, exportable=True, out_indices=[2, 3],
                                  pretrained=True, pretrained_cfg_overlay={"file": weights})
    extractor.load_state_dict(reference.state_dict())
    return model


def anomalib_predict(engine, model, loader, size: int, passes: int = 2) -> dict:
    """Raw scores and maps [n, size, size] of anomalib's predict loop, and its images/s per pass
    (the first pass includes loader start-up)."""
    import torch

    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        batches = engine.predict(model=model, dataloaders=loader)
        rates.append(len(loader.dataset) / (time.perf_counter() - started))
    paths = [p for batch in batches for p in batch.image_path]
    scores = torch.cat([batch.pred_score.flatten() for batch in batches])
    maps = torch.cat([batch.anomaly_map.reshape(len(batch.image_path), size, size) for batch in batches])
    return {"predict_images_per_s": rates, "paths": paths, "scores": scores.float().numpy(),
            "maps": maps.float().numpy()}


# ---------------------------------------------------------------- accuracy, the same for both tools


def accuracy(paths: list[str], scores: list[float], maps: np.ndarray, truth: dict[str, tuple[str, Path | None]],
             size: int) -> dict:
    """Image AUROC, pixel AUROC, AUPRO and per-defect-type image AUROC (each type against all good
    images) from raw `scores` [n] and `maps` [n, size, size]. `truth` maps each path to its
    (defect type or GOOD, mask path or None); a defect image without a mask gets an empty mask."""
    from sklearn.metrics import roc_auc_score

    from visiontune.anomaly.data import load_mask
    from visiontune.anomaly.metrics import aupro

    defects = [truth[str(p)][0] for p in paths]
    labels = np.array([d != GOOD for d in defects])
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.stack([
        load_mask(truth[str(p)][1], size, 10**9) if label and truth[str(p)][1] is not None
        else np.zeros((size, size), bool) for p, label in zip(paths, labels)
    ])
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ")
    good = ~labels
    per_type = {}
    for defect in sorted(set(defects) - {GOOD}):
        of_type = np.array([d == defect for d in defects])
        chosen = of_type | good
        per_type[defect] = {"images": int(of_type.sum()),
                            "image_auroc": float(roc_auc_score(labels[chosen], scores[chosen]))}
    return {"images": len(paths), "good_images": int(good.sum()), "defect_images": int(labels.sum()),
            "image_auroc": float(roc_auc_score(labels, scores)),
            "pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
            "aupro": aupro(maps, masks), "per_defect_type": per_type}
