"""visiontune's PatchCore and PaDiM against anomalib 2.7 on real defects: the magnetic-tile half in
../shared, same split, backbone, weights, layers, image size and coreset ratio for both tools.

    python benchmarks/anomaly_real.py [--part all|val|test] [--tools visiontune,anomalib]
        [--methods patchcore,padim] [--runs N] [--seed 0] [--shared ../shared] [--machine cpu]

Data: `MT_<Class>/Imgs/<name>.jpg` with a same-name .png mask (white = defect). The split is drawn
from --seed: 60% of the defect-free (MT_Free) images to fit on; the rest of them and all images of
the five defect types are held out. The held-out images are split again, per type (good included),
into a `val` half (n // 2 of each type) and a `test` half (the rest): `--part val` is for choosing
visiontune's defaults without touching `test`; `--part all` (val + test) is the issue's table.
Each part is laid out as symlinks in an MVTec AD-like folder, `<out>/data/seed<seed>-<part>/magnetic_tile/`:
    train/good/                       the 60% (both tools' fit images come from here)
    fit_good/                         the 90% of train/good that visiontune fits its detector on
                                      (visiontune.anomaly.workflow.split_holdout, seed 0; the other
                                      10% set its threshold): anomalib fits on exactly these
    test/good/, test/<type>/          the held-out images of the part
    ground_truth/<type>/<name>_mask.png
Files are renamed `<3-digit index>_<original stem>` so that file-name order pairs images and masks
the same way in anomalib's Folder datamodule (which pairs them by sorted path); `split.json` beside
it maps every link to its source.

Both tools: tf_efficientnet_lite0 with the shared weights file, layers blocks.2 + blocks.4 (for
PaDiM too), 256 px resize without crop, mean = std = 0.5, 1% coreset, PaDiM with 100 random
channels, batch 32, one loader worker, CPU, torch's default threads. anomalib reads the images
through its Folder datamodule with a 256 px resize as its augmentation (so images of different sizes
are not first resized to the batch's largest, and both tools see one resize of the original), its
pre-processor normalises, its normalisation is off (raw scores and maps).
Measured per tool x method, each in its own subprocess (anomaly_common.py): fit time, peak RSS,
images/s (visiontune: `visiontune.anomaly.evaluate` end to end, report included, and scoring alone,
`AnomalyModel.score`, two passes; anomalib: `Engine.predict` over the test loader, two passes; the
first pass includes loader start-up), and, computed here by the same code for both from raw scores
and maps: image AUROC, pixel AUROC, AUPRO (visiontune.anomaly.metrics.aupro) and image AUROC per
defect type (each type against the good test images). Masks are binarised by visiontune's rule
(bilinear resize to 256, >= 127.5); empty masks of defect images stay in (all-normal pixels).
anomalib's coreset sampling is unseeded: `--runs N` repeats anomalib PatchCore and reports min-max.
Results are merged into benchmarks/results/anomaly_real_<machine>.json (by part and run), and the
part's table is printed in markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_common import (
    BACKBONE,
    GOOD,
    LAYERS,
    accuracy,
    anomalib_model,
    anomalib_predict,
    ensure_anomalib_venv,
    load_average,
    peak_rss_gib,
    run_worker,
    visiontune_scores,
)

GOOD_CLASS = "Free"
DEFECT_CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
TRAIN_FRACTION = 0.6
CATEGORY = "magnetic_tile"
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- split and layout


def draw_split(source: Path, seed: int) -> dict:
    """{"train": [jpg], "val": {type: [jpg]}, "test": {type: [jpg]}} from `seed`; sorted lists."""
    def images(name: str) -> list[Path]:
        found = sorted((source / f"MT_{name}" / "Imgs").glob("*.jpg"))
        if not found:
            raise SystemExit(f"no images in {source / f'MT_{name}' / 'Imgs'}")
        return found

    rng = np.random.default_rng(seed)
    good = images(GOOD_CLASS)
    order = rng.permutation(len(good))
    n_train = round(TRAIN_FRACTION * len(good))
    held = {GOOD: sorted(good[i] for i in order[n_train:])}
    held |= {name.lower(): images(name) for name in DEFECT_CLASSES}
    split = {"train": sorted(good[i] for i in order[:n_train]), "val": {}, "test": {}}
    for kind, files in held.items():  # stratified: each type halved on its own
        order = rng.permutation(len(files))
        split["val"][kind] = sorted(files[i] for i in order[: len(files) // 2])
        split["test"][kind] = sorted(files[i] for i in order[len(files) // 2:])
    return split


def build_layout(split: dict, part: str, root: Path) -> tuple[Path, dict]:
    """The MVTec-like folder of `part` under `root` (see the module docstring) and its manifest:
    {"images": {link: {"type", "source", "mask"}}, "fit": [link], "counts": ...}."""
    from visiontune.anomaly.workflow import split_holdout
    from visiontune.data.sources import list_image_files

    held = {kind: split["val"][kind] + split["test"][kind] for kind in split["val"]} if part == "all" else split[part]
    held = {kind: sorted(files) for kind, files in held.items()}
    wanted = {"train": [str(p) for p in split["train"]], "held": {k: [str(p) for p in v] for k, v in held.items()}}
    layout = (root / CATEGORY).resolve()
    manifest_file = layout / "split.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest["wanted"] == wanted:
            return layout, manifest
    shutil.rmtree(layout, ignore_errors=True)
    images: dict[str, dict] = {}

    def link(source: Path, folder: Path, index: int, kind: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{index:03d}_{source.stem}{source.suffix}"
        target.symlink_to(source)
        entry = {"type": kind, "source": str(source), "mask": None}
        if kind != GOOD:
            mask = layout / "ground_truth" / kind / f"{index:03d}_{source.stem}_mask.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            mask.symlink_to(source.with_suffix(".png"))
            entry["mask"] = str(mask)
        images[str(target)] = entry
        return target

    for i, source in enumerate(split["train"]):
        link(source, layout / "train" / GOOD, i, GOOD)
    for kind, files in held.items():
        for i, source in enumerate(files):
            link(source, layout / "test" / kind, i, kind)
    # What visiontune's fit keeps after holding out 10% for its threshold (same call, same seed).
    fit, _ = split_holdout(list_image_files(layout / "train" / GOOD), 0.1, 0)
    (layout / "fit_good").mkdir()
    for path in fit:
        (layout / "fit_good" / path.name).symlink_to(path.resolve())
    manifest = {
        "wanted": wanted, "images": images, "fit": [str(layout / "fit_good" / p.name) for p in fit],
        "counts": {"train": len(split["train"]), "fit": len(fit), "test": {k: len(v) for k, v in held.items()}},
        "sha256": hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16],
    }
    manifest_file.write_text(json.dumps(manifest, indent=1) + "\n")
    return layout, manifest


def test_links(layout: Path) -> list[Path]:
    return sorted(p for p in (layout / "test").glob("*/*.jpg"))


# ---------------------------------------------------------------- workers (run in subprocesses)


def visiontune_worker(args: argparse.Namespace) -> dict:
    from visiontune import anomaly
    from visiontune.anomaly.data import labelled_images

    layout, out = Path(args.data), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    model = anomaly.fit(
        layout, method=args.method, backbone=BACKBONE, layers=LAYERS, image_size=args.size,
        coreset_ratio=args.coreset_ratio, n_features=100, weights=args.weights, batch_size=32, workers=1,
        out=out / "model", device="cpu", calibration="holdout",
    )
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_timings": model.fit_info_["timings"], "fit_info": {
        k: model.fit_info_[k] for k in ("train_images", "holdout_images")}, "threshold": model.threshold_,
        "fit_rss_gib": peak_rss_gib()}
    paths = [image.path for image in labelled_images(layout)]
    started = time.perf_counter()
    metrics = anomaly.evaluate(model, layout, out=out / "evaluation")
    evaluate_s = time.perf_counter() - started
    result |= {"evaluate_s": evaluate_s, "evaluate_images_per_s": len(paths) / evaluate_s,
               "own_metrics": {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold",
                                                       "recall_at_threshold", "false_alarm_rate_at_threshold")}}
    return result | visiontune_scores(model, paths, out, "score_images_per_s")


def anomalib_worker(args: argparse.Namespace) -> dict:
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from torchvision.transforms import v2

    layout, out = Path(args.data), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model = anomalib_model(args.method, args.size, args.coreset_ratio, args.weights)
    defects = sorted(d.name for d in (layout / "test").iterdir() if d.is_dir() and d.name != GOOD)
    datamodule = Folder(
        name=CATEGORY, root=layout, normal_dir="fit_good", normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects], mask_dir=[f"ground_truth/{d}" for d in defects],
        extensions=(".jpg", ".png"), train_batch_size=32, eval_batch_size=32, num_workers=1,
        augmentations=v2.Resize((args.size, args.size), antialias=True),
        test_split_mode="from_dir", val_split_mode="none", seed=0,
    )
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(out),
                    enable_progress_bar=False)
    started = time.perf_counter()
    datamodule.setup()  # no validation loader (anomalib's own thresholds and normalisation are not used)
    engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
    fit_s = time.perf_counter() - started
    result = {"fit_s": fit_s, "fit_images": len(datamodule.train_data), "fit_rss_gib": peak_rss_gib()}
    if args.method == "patchcore":
        result["memory_bank"] = list(model.model.memory_bank.shape)
    predicted = anomalib_predict(engine, model, datamodule.test_dataloader(), args.size)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "maps.npy", predicted["maps"])
    return result | {"predict_images_per_s": predicted["predict_images_per_s"], "paths": predicted["paths"],
                     "scores": predicted["scores"].tolist(), "maps": str(out / "maps.npy"),
                     "peak_rss_gib": peak_rss_gib()}


# ---------------------------------------------------------------- orchestration


def measure(python: Path, tool: str, method: str, args: argparse.Namespace, layout: Path, manifest: dict,
            out: Path) -> dict:
    command = ["--worker", tool, "--method", method, "--data", str(layout), "--out", str(out),
               "--weights", args.weights, "--size", str(args.size), "--coreset-ratio", str(args.coreset_ratio)]
    result = run_worker(python, __file__, command, timeout=args.timeout, stderr_log=out.with_suffix(".stderr.log"))
    if "error" in result:
        return result
    truth = {}
    for link, entry in manifest["images"].items():
        mask = Path(entry["mask"]) if entry["mask"] else None
        truth[link] = truth[str(Path(link).resolve())] = (entry["type"], mask)
    measured = accuracy(result.pop("paths"), result.pop("scores"), np.load(result.pop("maps")), truth, args.size)
    if measured["images"] != len(test_links(layout)):
        measured["warning"] = f"scored {measured['images']} of {len(test_links(layout))} test images"
    return result | measured


def summarise_runs(runs: list[dict]) -> dict:
    """min / max of each number over repeated runs (those without an error)."""
    ok = [r for r in runs if "error" not in r]
    keys = ["fit_s", "image_auroc", "pixel_auroc", "aupro", "peak_rss_gib"]
    summary = {k: [min(r[k] for r in ok), max(r[k] for r in ok)] for k in keys} if ok else {}
    if ok:
        rates = [r["predict_images_per_s"][-1] for r in ok]
        summary["predict_images_per_s"] = [min(rates), max(rates)]
        summary["per_defect_type"] = {t: [min(r["per_defect_type"][t]["image_auroc"] for r in ok),
                                          max(r["per_defect_type"][t]["image_auroc"] for r in ok)]
                                      for t in ok[0]["per_defect_type"]}
    return {"runs": runs, "completed": len(ok), "range": summary}


def record(results_file: Path, settings: dict, part: str, split_info: dict, name: str, value) -> None:
    """Merge one entry into the results file as it is now (other invocations may have written to it)."""
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["settings"] = settings
    entry = results.setdefault("parts", {}).setdefault(part, {})
    entry["split"] = split_info
    if name == "anomalib_install_error":
        entry[name] = value
    else:
        entry.setdefault("runs", {})[name] = value
    results_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = results_file.with_name(results_file.name + f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(results_file)


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, list):
        low, high = (fmt(v, digits) for v in value)
        return low if low == high else f"{low}-{high}"
    return "" if value is None else f"{value:.{digits}f}"


def table(runs: dict) -> str:
    """Markdown table of one part's runs."""
    types = [d.lower() for d in DEFECT_CLASSES]
    head = ["run", "fit s", "img/s (visiontune: evaluate / score; anomalib: predict)", "image AUROC", "pixel AUROC", "AUPRO",
            *[f"{t} AUROC" for t in types], "peak RSS GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in sorted(runs.items()):
        if "range" in run:  # repeated anomalib PatchCore
            r = run["range"]
            if not r:
                lines.append(f"| {name} | failed: {run['runs'][-1].get('error', '')[:120]} |")
                continue
            row = [f"{name} ({run['completed']} runs)", fmt(r["fit_s"], 0), fmt(r["predict_images_per_s"], 1),
                   fmt(r["image_auroc"]), fmt(r["pixel_auroc"]), fmt(r["aupro"]),
                   *[fmt(r["per_defect_type"].get(t)) for t in types], fmt(r["peak_rss_gib"], 2)]
        elif "error" in run:
            lines.append(f"| {name} | failed: {run['error'][:120]} |")
            continue
        else:
            rate = (f"{run['evaluate_images_per_s']:.1f} / {run['score_images_per_s'][-1]:.1f}"
                    if "evaluate_images_per_s" in run else f"{run['predict_images_per_s'][-1]:.1f}")
            row = [name, fmt(run["fit_s"], 0), rate, fmt(run["image_auroc"]), fmt(run["pixel_auroc"]),
                   fmt(run["aupro"]), *[fmt(run["per_defect_type"].get(t, {}).get("image_auroc")) for t in types],
                   fmt(run["peak_rss_gib"], 2)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(HERE.parents[1] / "shared"))
    parser.add_argument("--part", choices=["val", "test", "all"], default="all")
    parser.add_argument("--tools", default="visiontune,anomalib")
    parser.add_argument("--methods", default="patchcore,padim")
    parser.add_argument("--runs", type=int, default=1, help="repeats of anomalib PatchCore (unseeded coreset)")
    parser.add_argument("--seed", type=int, default=0, help="of the split")
    parser.add_argument("--out", default="runs/bench-anomaly-real", help="layouts, models, maps")
    parser.add_argument("--machine", default="cpu", help="names the results file")
    parser.add_argument("--results", help="default: benchmarks/results/anomaly_real_<machine>.json")
    parser.add_argument("--anomalib-venv", default="/tmp/anomalib-venv")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per worker")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--worker", choices=["visiontune", "anomalib"])
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--data")
    parser.add_argument("--weights")
    args = parser.parse_args()

    if args.worker:
        worker = visiontune_worker if args.worker == "visiontune" else anomalib_worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    shared = Path(args.shared)
    args.weights = str((shared / "weights" / f"{BACKBONE}.in1k.safetensors").resolve())
    if not Path(args.weights).is_file():
        raise SystemExit(f"needs {args.weights}")
    out = Path(args.out).resolve()
    split = draw_split(shared / "data" / "magnetic-tile", args.seed)
    layout, manifest = build_layout(split, args.part, out / "data" / f"seed{args.seed}-{args.part}")
    print(f"{args.part}: {manifest['counts']} in {layout}", flush=True)

    results_file = Path(args.results or HERE / "results" / f"anomaly_real_{args.machine}.json")
    settings = {
        "data": "magnetic-tile half in ../shared", "backbone": BACKBONE, "weights": Path(args.weights).name,
        "layers": LAYERS, "image_size": args.size, "resize": "to a square, no crop", "coreset_ratio": args.coreset_ratio,
        "padim_channels": 100, "batch_size": 32, "loader_workers": 1, "device": "cpu",
        "train_fraction": TRAIN_FRACTION, "split_seed": args.seed,
    }
    split_info = {"counts": manifest["counts"], "sha256": manifest["sha256"]}
    tools = args.tools.split(",")
    pythons = {"visiontune": Path(sys.executable)}
    if "anomalib" in tools:
        try:
            pythons["anomalib"] = ensure_anomalib_venv(Path(args.anomalib_venv))
        except Exception as exc:  # noqa: BLE001 - reported in the results, the other tool still runs
            error = f"{type(exc).__name__}: {exc}"
            record(results_file, settings, args.part, split_info, "anomalib_install_error", error)
            print(f"anomalib could not be installed: {error}", flush=True)
    machine = {"machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.node()}), shared with other work",
               "python": platform.python_version(), "niceness": os.nice(0)}
    for method in args.methods.split(","):
        for tool in tools:
            if tool not in pythons:
                continue
            repeats = args.runs if (tool, method) == ("anomalib", "patchcore") else 1
            done = []
            for i in range(repeats):
                print(f"{time.strftime('%H:%M:%S')} {tool} {method} ({args.part}) run {i + 1}/{repeats}, "
                      f"load {load_average()} ...", flush=True)
                name = f"{tool}-{method}" + (f"-{i}" if repeats > 1 else "")
                result = measure(pythons[tool], tool, method, args, layout, manifest, out / args.part / name)
                result |= {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **machine}
                done.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "per_defect_type"}), flush=True)
                # after each run, so that a kill keeps what was measured
                record(results_file, settings, args.part, split_info, f"{tool}-{method}",
                       summarise_runs(done) if repeats > 1 else done[0])
    runs = json.loads(results_file.read_text())["parts"][args.part]["runs"]
    print(f"\n{args.part} part ({results_file}):\n")
    print(table(runs))


if __name__ == "__main__":
    main()
