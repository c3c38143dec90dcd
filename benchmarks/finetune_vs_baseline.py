"""Issue #5: visiontune against a plain PyTorch transfer-learning baseline, in one run, same machine.

The baseline is the official PyTorch transfer-learning tutorial's code (ImageFolder,
RandomResizedCrop + flip for train, Resize + CenterCrop for val, DataLoader with workers, SGD with
momentum and StepLR, batch 4), with the tutorial's two variants: fine-tune all layers, and the
"fixed feature extractor" (only the new head trains, the backbone still runs every epoch). It is
given its best chance: the backbone's own mean/std (not the tutorial's hard-coded ImageNet values),
and the torch thread / loader worker setting that is fastest on this machine, chosen by a probe
in this run. Uses ../shared (hymenoptera and the lite0 weights), not part of the repo.

Measured: wall time from nothing (model creation) to the first epoch whose val accuracy reaches
the target, for both baselines and for visiontune (cached-feature frozen stage, and the default
recipe); full fine-tuning throughput at the same model, batch and image size; and, optionally,
the same with a busy neighbour process holding one core.

    python benchmarks/finetune_vs_baseline.py [--shared ../shared] [--neighbour] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import visiontune
from visiontune.devices import plan_cpu

MODEL = "tf_efficientnet_lite0"


# -- the baseline, as the tutorial writes it -------------------------------------------------------


def baseline_loaders(data: Path, mean, std, batch_size: int, workers: int) -> dict[str, DataLoader]:
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean, std),
        ]),
        "val": transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(mean, std),
        ]),
    }
    image_datasets = {x: datasets.ImageFolder(data / x, data_transforms[x]) for x in ("train", "val")}
    return {
        x: DataLoader(image_datasets[x], batch_size=batch_size, shuffle=x == "train", num_workers=workers)
        for x in ("train", "val")
    }


def baseline_model(weights: Path, fixed_features: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    if fixed_features:
        for param in model.parameters():
            param.requires_grad = False
    model.reset_classifier(2)  # the tutorial's `model.fc = nn.Linear(num_ftrs, 2)`
    params = model.get_classifier().parameters() if fixed_features else model.parameters()
    return model, torch.optim.SGD(params, lr=0.001, momentum=0.9)


def baseline_time_to_target(data, weights, mean, std, fixed_features: bool, workers: int, target: float,
                            max_epochs: int) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    model, optimizer = baseline_model(weights, fixed_features)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    loaders = baseline_loaders(data, mean, std, 4, workers)
    history = []
    for epoch in range(max_epochs):
        for phase in ("train", "val"):
            model.train(phase == "train")
            correct = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += (outputs.argmax(1) == labels).sum().item()
            if phase == "train":
                scheduler.step()
        accuracy = correct / len(loaders["val"].dataset)
        history.append({"epoch": epoch + 1, "val_accuracy": accuracy, "elapsed_s": time.perf_counter() - started})
        print(f"  baseline {'fixed-feature' if fixed_features else 'fine-tune-all'} epoch {epoch + 1}: "
              f"val acc {accuracy:.3f} at {history[-1]['elapsed_s']:.1f}s", flush=True)
        if accuracy >= target:
            break
    return _reached(history, target)


def probe_baseline_setting(data, weights, mean, std, settings, batch_size=4, steps=12) -> list[dict]:
    """Steady-state train img/s and loader start-up for each (threads, workers); full fine-tuning."""
    results = []
    for threads, workers in settings:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model, optimizer = baseline_model(weights, fixed_features=False)
        model.train()
        loader = baseline_loaders(data, mean, std, batch_size, workers)["train"]
        t0 = time.perf_counter()
        batches = iter(loader)
        times = []
        for step in range(steps + 2):
            inputs, labels = next(batches)
            if step == 0:
                startup = time.perf_counter() - t0
            t_step = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            if step >= 2:  # warm-up
                times.append(time.perf_counter() - t_step)
        del batches
        img_s = batch_size / statistics.median(times)
        n_train = len(loader.dataset)
        results.append({"threads": threads, "workers": workers, "train_img_s": img_s, "loader_startup_s": startup,
                        "predicted_epoch_s": startup + n_train / img_s})
        print(f"  probe threads={threads} workers={workers}: {img_s:.1f} img/s, start-up {startup:.1f}s", flush=True)
    return results


def baseline_epoch_throughput(data, weights, mean, std, batch_size: int, workers: int) -> float:
    """One full fine-tuning epoch of the baseline at `batch_size`: images/s, start-up included."""
    torch.manual_seed(0)
    model, optimizer = baseline_model(weights, fixed_features=False)
    model.train()
    loader = baseline_loaders(data, mean, std, batch_size, workers)["train"]
    t0, seen = time.perf_counter(), 0
    for inputs, labels in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - t0)


# -- visiontune ------------------------------------------------------------------------------------


class StopAtTarget:
    """Records elapsed time per epoch; stops the run once the target is reached (if asked)."""

    def __init__(self, started: float, target: float, stop: bool, stop_after: int | None = None) -> None:
        self.started, self.target, self.stop, self.stop_after = started, target, stop, stop_after
        self.history: list[dict] = []

    def on_epoch_end(self, tuner, record: dict) -> None:
        self.history.append({**record, "elapsed_s": time.perf_counter() - self.started})
        print(f"  visiontune epoch {record['epoch']} [{record['stage']}]: val acc {record['val_accuracy']:.3f} "
              f"at {self.history[-1]['elapsed_s']:.1f}s", flush=True)
        if (self.stop and record["val_accuracy"] >= self.target) or record["epoch"] == self.stop_after:
            raise _Stop


class _Stop(Exception):
    pass


def visiontune_time_to_target(data, weights, target, out: Path, stop: bool = True, stop_after=None, **options) -> dict:
    started = time.perf_counter()
    recorder = StopAtTarget(started, target, stop, stop_after)
    with contextlib.suppress(_Stop):
        visiontune.fit(data, model=MODEL, weights=str(weights), out=str(out), progress=False, report=False,
                       callbacks=[recorder], **options)
    return {**_reached(recorder.history, target), "history": recorder.history}


def _reached(history: list[dict], target: float) -> dict:
    hit = next((h for h in history if h["val_accuracy"] >= target), None)
    return {
        "reached": hit is not None,
        "epoch": hit["epoch"] if hit else None,
        "seconds": hit["elapsed_s"] if hit else None,
        "val_accuracy": hit["val_accuracy"] if hit else max(h["val_accuracy"] for h in history),
        "per_epoch": [(h["epoch"], round(h["val_accuracy"], 4), round(h["elapsed_s"], 1)) for h in history],
    }


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_neighbour():
    process = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
    process.start()
    time.sleep(1.0)
    try:
        yield
    finally:
        process.terminate()
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--target", type=float, default=0.92)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--neighbour", action="store_true", help="also measure with a process spinning on one core")
    parser.add_argument("--json", default="benchmarks/results/finetune_vs_baseline.json")
    args = parser.parse_args()
    shared = Path(args.shared)
    data, weights = shared / "data/hymenoptera", shared / "weights/tf_efficientnet_lite0.in1k.safetensors"
    if not data.is_dir() or not weights.is_file():
        raise SystemExit(f"needs {data} and {weights}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = timm.data.resolve_model_data_config(timm.create_model(MODEL, pretrained=False))
    mean, std = cfg["mean"], cfg["std"]
    scratch = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    os.environ["VISIONTUNE_CACHE"] = str(scratch / "decoded")  # the first visiontune run starts cold
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "torch": torch.__version__, "load_before": os.getloadavg()}

    print("baseline: choosing threads and workers", flush=True)
    probes = probe_baseline_setting(data, weights, mean, std, [(1, 0), (2, 0), (1, 1), (2, 1), (2, 2)])
    best = min(probes, key=lambda p: p["predicted_epoch_s"])
    result["baseline_probe"], result["baseline_setting"] = probes, {"threads": best["threads"], "workers": best["workers"]}
    torch.set_num_threads(best["threads"])
    print(f"baseline setting: {best['threads']} thread(s), {best['workers']} worker(s)", flush=True)

    result["baseline_fixed_feature"] = baseline_time_to_target(
        data, weights, mean, std, True, best["workers"], args.target, args.max_epochs)
    result["baseline_fine_tune_all"] = baseline_time_to_target(
        data, weights, mean, std, False, best["workers"], args.target, args.max_epochs)

    torch.set_num_threads(os.cpu_count() or 1)  # visiontune chooses its own
    print(f"visiontune plan: {plan_cpu().describe()}", flush=True)
    result["visiontune_cached"] = visiontune_time_to_target(
        data, weights, args.target, scratch / "cached", epochs=5, freeze_epochs=5, augment="none")
    result["visiontune_default"] = visiontune_time_to_target(
        data, weights, args.target, scratch / "default", stop=False, stop_after=2, epochs=3)

    unfrozen = next(h for h in result["visiontune_default"]["history"] if h["stage"] == "unfrozen")
    n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))
    torch.set_num_threads(best["threads"])
    result["throughput_batch32"] = {
        "baseline_img_s": baseline_epoch_throughput(data, weights, mean, std, 32, best["workers"]),
        "visiontune_img_s": n_train / unfrozen["train_seconds"],
    }

    if args.neighbour:
        print("with a busy neighbour on one core", flush=True)
        with busy_neighbour():
            probes = probe_baseline_setting(data, weights, mean, std, [(1, 0), (2, 0), (2, 1)], steps=6)
            torch.set_num_threads(os.cpu_count() or 1)
            plan = plan_cpu()
            cached = visiontune_time_to_target(
                data, weights, args.target, scratch / "neighbour", epochs=5, freeze_epochs=5, augment="none")
        result["neighbour"] = {"baseline_probe": probes, "visiontune_plan": plan.describe(), "visiontune_cached": cached}

    base = min((result["baseline_fixed_feature"], result["baseline_fine_tune_all"]),
               key=lambda r: r["seconds"] if r["reached"] else float("inf"))
    result["ratio_time_to_target"] = (result["visiontune_cached"]["seconds"] / base["seconds"]
                                      if base["reached"] and result["visiontune_cached"]["reached"] else None)
    result["ratio_throughput"] = result["throughput_batch32"]["visiontune_img_s"] / result["throughput_batch32"]["baseline_img_s"]
    result["load_after"] = os.getloadavg()
    shutil.rmtree(scratch, ignore_errors=True)
    for h in result["visiontune_default"]["history"]:
        h.pop("lr", None), h.pop("backbone_lr", None)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "throughput", "baseline_setting"))}, indent=2))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
