"""One GPU check for issue 19, in at most 8 minutes on one H100: training, inference, end-to-end
predict and PatchCore images/s, and a 1-GPU DDP run, written to one JSON file.

    python benchmarks/gpu_check.py [OUT.json]            # default $OUT/gpu_check.json
    python benchmarks/gpu_check.py --smoke /tmp/g.json   # tiny sizes on the CPU, about 30 s

Offline by design: no pip, no hub. The models are random-init (ResNet-50; PatchCore on a
random-init tf_efficientnet_lite0) and every image is generated here. Each section is
try/except'd and time-boxed: its error is recorded and the next one runs; sections stop early
(with what they measured) when the whole budget is spent. Nothing here has run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"train_images_per_s_bf16": 3000, "inference_images_per_s_batch_256": 10000,
           "predict_images_per_s": 3000}

FULL = dict(model="resnet50", warmup=3, budget_s=440, jpegs=2000, jpeg_px=256, train_size=224, train_batch=256, train_steps=30,
            inference_batches=(1, 8, 32, 64, 128, 256), inference_size=224, inference_repeats=20,
            predict_batch=256, patchcore_images=10000, patchcore_px=128, skip_compile=False,
            sections={"train": 120, "inference": 45, "predict": 90, "patchcore": 140, "ddp": 45})
SMOKE = dict(model="resnet18", warmup=1, budget_s=25, jpegs=16, jpeg_px=32, train_size=32, train_batch=8, train_steps=1,
             inference_batches=(1, 8), inference_size=32, inference_repeats=2,
             predict_batch=8, patchcore_images=8, patchcore_px=32, skip_compile=True,
             sections={"train": 3, "inference": 2, "predict": 10, "patchcore": 8, "ddp": 2})


class Clock:
    """The whole budget and each section's share of it."""

    def __init__(self, budget_s: float) -> None:
        self.started, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def classifier(cfg: dict, device: torch.device) -> torch.nn.Module:
    import timm

    return timm.create_model(cfg["model"], pretrained=False, num_classes=2).to(device, memory_format=torch.channels_last)


def write_jpegs(root: Path, count: int, px: int) -> list[Path]:
    """count JPEGs in two class folders (an ImageFolder layout `visiontune train` reads)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((px, px), Image.BILINEAR)
        paths.append(folder / f"{i:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def timed_steps(step, steps: int, device: torch.device, deadline: float, warmup: int) -> dict:
    """Images/s of `step()` (returns its batch size) after `warmup` calls, stopping at `deadline`
    (after at least one timed call)."""
    for _ in range(warmup):
        step()
    sync(device)
    started, images, done = time.perf_counter(), 0, 0
    while done < steps and (done == 0 or time.perf_counter() < deadline):
        images += step()
        done += 1
    sync(device)
    elapsed = time.perf_counter() - started
    return {"images_per_s": images / elapsed if elapsed else None, "steps": done, "seconds": elapsed}


def train_section(cfg: dict, device: torch.device, paths: list[Path], deadline: float) -> dict:
    """ResNet-50 (smoke: ResNet-18) training steps in bf16 autocast, channels_last, eager and torch.compile'd, on one
    in-memory batch and on the JPEGs decoded by the library's ImageFiles through a DataLoader."""
    from torch.utils.data import DataLoader

    from visiontune.data.dataset import ImageFiles, collate_image_files
    from visiontune.data.transforms import Preprocessing

    size, batch = cfg["train_size"], cfg["train_batch"]
    result = {}
    transform = Preprocessing.from_model(classifier(cfg, "cpu"), size).train_transform("light")
    for compiled in (False, True):
        if compiled and cfg["skip_compile"]:
            result["synthetic_compiled"] = {"skipped": "smoke run: torch.compile's C++ build takes minutes on a CPU"}
            continue
        model = classifier(cfg, device)
        network = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        labels = torch.randint(0, 2, (batch,), device=device)

        def step(images: torch.Tensor) -> int:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(network(images), labels[:len(images)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return len(images)

        name = "compiled" if compiled else "eager"
        synthetic = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        section_end = min(deadline, time.perf_counter() + (deadline - time.perf_counter()) / (2 if compiled else 4))
        try:
            result[f"synthetic_{name}"] = timed_steps(lambda: step(synthetic), cfg["train_steps"], device, section_end,
                                                       cfg["warmup"])
        except Exception as exc:  # torch.compile can fail on a given stack: record and go on
            result[f"synthetic_{name}"] = {"error": repr(exc)[:500]}
            continue
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        loader = DataLoader(ImageFiles(paths, transform, 10**8), batch_size=batch, shuffle=True, drop_last=True,
                            num_workers=workers, collate_fn=collate_image_files, pin_memory=device.type == "cuda",
                            persistent_workers=workers > 0)
        batches = iter(())

        def real_step() -> int:
            nonlocal batches
            try:
                images, _, _ = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, _, _ = next(batches)
            images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
            return step(images)

        try:
            result[f"jpeg_{name}"] = timed_steps(real_step, cfg["train_steps"], device,
                                                 min(deadline, time.perf_counter() + (deadline - time.perf_counter()) / 2),
                                                 warmup=1) | {"loader_workers": workers}
        except Exception as exc:
            result[f"jpeg_{name}"] = {"error": repr(exc)[:500]}
    return result


def inference_section(cfg: dict, device: torch.device, deadline: float) -> dict:
    """Model-only images/s by batch size: bf16 autocast, channels_last, inference_mode, warmed up,
    timed between torch.cuda.synchronize() calls."""
    model = classifier(cfg, device).eval()
    size, result = cfg["inference_size"], {}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for batch in cfg["inference_batches"]:
            if time.perf_counter() > deadline:
                result[str(batch)] = {"skipped": "budget spent"}
                continue
            images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
            result[str(batch)] = timed_steps(lambda: len(model(images)), cfg["inference_repeats"], device, deadline,
                                             warmup=cfg["warmup"])
    return result


def predict_section(cfg: dict, device: torch.device, data: Path, paths: list[Path], work: Path) -> dict:
    """End-to-end `predict` (files in, rows out) with a run made by one tiny epoch of a random-init
    ResNet-50 (visiontune.fit), timed on the JPEGs after one warm-up pass over a few of them. On
    CUDA, predict decodes the JPEGs on the GPU itself (`data.jpeg_batches`); the decode stage alone
    (`iter_jpeg_batches`, no model) is timed too, to show whether decoding is the cap."""
    import visiontune

    started = time.perf_counter()
    run = visiontune.fit(str(data), model=cfg["model"], pretrained=False, epochs=1, image_size=cfg["train_size"],
                         batch_size=cfg["train_batch"], out=str(work / "run"), report=False,
                         device=device.type, progress=False)
    result = {"make_run_s": time.perf_counter() - started}
    name = "gpu_decode" if device.type == "cuda" else "cpu_decode"
    run.predict([str(p) for p in paths[:cfg["predict_batch"]]], device=device.type, batch_size=cfg["predict_batch"])
    started = time.perf_counter()
    predicted = run.predict([str(p) for p in paths], device=device.type, batch_size=cfg["predict_batch"])
    elapsed = time.perf_counter() - started
    result[name] = {"images_per_s": len(predicted.rows) / elapsed, "images": len(predicted.rows),
                    "skipped": len(predicted.skipped), "seconds": elapsed}
    result["decode_only"] = decode_only(run, [str(p) for p in paths], cfg["predict_batch"], device)
    return result


def decode_only(run, paths: list[str], batch: int, device: torch.device) -> dict:
    """Images/s of the batched decode + resize stage predict uses on this device, without the model."""
    from visiontune.data.jpeg_batches import iter_jpeg_batches

    transform = run.preprocessing.eval_transform(normalize=False)
    started, images = time.perf_counter(), 0
    for batch_images, _, _ in iter_jpeg_batches(paths, transform, run.config.max_pixels, batch, 4, device):
        images += 0 if batch_images is None else len(batch_images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"images_per_s": images / elapsed, "images": images, "seconds": elapsed}


def patchcore_section(cfg: dict, device: torch.device, work: Path) -> dict:
    """PatchCore fitted on generated textures (anomaly_vs_anomalib.make_dataset) on the device,
    random-init tf_efficientnet_lite0, blocks.2 + blocks.4, 1% coreset, 10% held out."""
    from anomaly_vs_anomalib import make_dataset

    from visiontune import anomaly

    started = time.perf_counter()
    data = make_dataset(work / "textures", cfg["patchcore_images"], 2, cfg["patchcore_px"], seed=2)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    model = anomaly.fit(data, method="patchcore", backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"],
                        image_size=cfg["patchcore_px"], pretrained=False, batch_size=64, device=device.type)
    return {"generate_s": generate_s, "fit_s": time.perf_counter() - started, "images": cfg["patchcore_images"],
            "timings": model.fit_info_["timings"], "memory_bank": list(model.detector.memory_bank_.shape)}


def ddp_section(cfg: dict, device: torch.device, data: Path, work: Path, timeout: float) -> dict:
    """`visiontune train ... --devices 1 --strategy ddp` when the CLI has those flags."""
    cli = [sys.executable, "-m", "visiontune.cli.main", "train"]
    help_text = subprocess.run(cli + ["--help"], capture_output=True, text=True, timeout=60).stdout
    if "--strategy" not in help_text or "--devices" not in help_text:
        return {"skipped": "flags missing: visiontune train has no --devices / --strategy"}
    command = cli + [str(data), "--model", cfg["model"], "--no-pretrained", "--epochs", "1", "--image-size",
                     str(cfg["train_size"]), "--batch-size", str(cfg["train_batch"]), "--no-report",
                     "--device", device.type, "--devices", "1", "--strategy", "ddp", "--out", str(work / "ddp-run")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return {"returncode": done.returncode, "seconds": time.perf_counter() - started,
            "tail": (done.stdout + done.stderr)[-1500:]}


def child_command(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    command = [sys.executable, __file__, "--section", name, "--work", str(work)] + (["--smoke"] if args.smoke else [])
    return command


def patchcore_after(textures: subprocess.Popen, args: argparse.Namespace, work: Path, budget: float) -> dict:
    """The PatchCore section once the background texture writer is done, within `budget`."""
    started = time.perf_counter()
    try:
        textures.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        textures.kill()
        return {"error": f"the texture data were not written within {budget:.0f} s"}
    if textures.returncode != 0:
        return {"error": f"writing the texture data failed (exit {textures.returncode})"}
    waited = time.perf_counter() - started
    return isolated("patchcore", args, work, budget - waited) | {"waited_for_data_s": waited,
                                                                 **json.loads((work / "textures.json").read_text())}


def isolated(name: str, args: argparse.Namespace, work: Path, timeout: float) -> dict:
    """A section that cannot stop itself (a fit) in a child process of this script, killed at
    `timeout`; its result comes back as JSON."""
    result_file = work / f"{name}.json"
    try:
        done = subprocess.run(child_command(name, args, work), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at its budget of {timeout:.0f} s"}
    if done.returncode != 0 or not result_file.is_file():
        return {"error": f"exit {done.returncode}", "tail": (done.stdout + done.stderr)[-1500:]}
    return json.loads(result_file.read_text())


def child_section(name: str, args: argparse.Namespace, cfg: dict, device: torch.device) -> None:
    work = Path(args.work)
    paths = sorted((work / "jpegs").glob("*/*.jpg"))
    if name == "textures":
        from anomaly_vs_anomalib import make_dataset

        started = time.perf_counter()
        make_dataset(work / "textures", cfg["patchcore_images"], 2, cfg["patchcore_px"], seed=2)
        result = {"generate_s": time.perf_counter() - started}
    elif name == "predict":
        result = predict_section(cfg, device, work / "jpegs", paths, work)
    else:
        result = patchcore_section(cfg, device, work)
    (work / f"{name}.json").write_text(json.dumps(result))


def run_section(report: dict, name: str, clock: Clock, share: float, body) -> None:
    budget = min(share, clock.left())
    if budget <= 1:
        report["sections"][name] = {"skipped": "total budget spent"}
        return
    started = time.perf_counter()
    try:
        report["sections"][name] = body(time.perf_counter() + budget, budget)
    except Exception as exc:
        report["sections"][name] = {"error": repr(exc)[:1000], "traceback": traceback.format_exc()[-2000:]}
    report["sections"][name]["section_s"] = time.perf_counter() - started
    write_report(report)  # so a run killed later still leaves what it measured
    print(f"{name}: {json.dumps(report['sections'][name])[:400]}", flush=True)


def write_report(report: dict) -> None:
    report["targets"] = targets(report)
    path = Path(report["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def targets(report: dict) -> dict:
    sections = report["sections"]

    def best(*values):
        found = [v for v in values if isinstance(v, (int, float))]
        return max(found) if found else None

    train = sections.get("train", {})
    measured = {
        "train_images_per_s_bf16": best(*(train.get(k, {}).get("images_per_s") for k in
                                          ("jpeg_eager", "jpeg_compiled"))),
        "inference_images_per_s_batch_256": sections.get("inference", {}).get("256", {}).get("images_per_s"),
        "predict_images_per_s": best(*(sections.get("predict", {}).get(k, {}).get("images_per_s")
                                       for k in ("cpu_decode", "gpu_decode"))),
    }
    return {key: {"target": TARGETS[key], "measured": value, "met": None if value is None else value >= TARGETS[key]}
            for key, value in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None, help="JSON file; default $OUT/gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 60 s), to test the script")
    parser.add_argument("--section", choices=["predict", "patchcore", "textures"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.section:
        child_section(args.section, args, cfg, device)
        return
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    import timm

    import visiontune

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    report = {"path": str(out), "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "torch": torch.__version__, "timm": timm.__version__, "visiontune": visiontune.__version__,
              "smoke": args.smoke, "settings": {k: v for k, v in cfg.items() if k != "sections"},
              "section_budgets_s": cfg["sections"], "sections": {}}
    clock = Clock(cfg["budget_s"])
    budgets = cfg["sections"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        paths = write_jpegs(work / "jpegs", cfg["jpegs"], cfg["jpeg_px"])
        report["jpegs"] = {"count": len(paths), "px": cfg["jpeg_px"], "write_s": time.perf_counter() - started}
        # PatchCore's 10,000 PNGs are written on one CPU core while the GPU sections run
        textures = subprocess.Popen(child_command("textures", args, work), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        run_section(report, "train", clock, budgets["train"], lambda end, _: train_section(cfg, device, paths, end))
        run_section(report, "inference", clock, budgets["inference"], lambda end, _: inference_section(cfg, device, end))
        run_section(report, "predict", clock, budgets["predict"], lambda _, budget: isolated("predict", args, work, budget))
        run_section(report, "patchcore", clock, budgets["patchcore"],
                    lambda _, budget: patchcore_after(textures, args, work, budget))
        run_section(report, "ddp", clock, budgets["ddp"],
                    lambda end, budget: ddp_section(cfg, device, work / "jpegs", work, budget))
        if textures.poll() is None:  # PatchCore skipped: stop the writer before its folder goes
            textures.kill()
            textures.wait()
    report["total_s"] = time.perf_counter() - clock.started
    write_report(report)
    print(f"written: {out} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
