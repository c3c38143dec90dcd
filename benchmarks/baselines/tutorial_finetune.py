"""Baseline: the PyTorch transfer-learning tutorial's recipe (fine-tune all layers) on a split CSV.

As the tutorial writes it: a fresh linear head, SGD (lr 1e-3, momentum 0.9), StepLR (step 7,
gamma 0.1), batch 4, RandomResizedCrop + horizontal flip for train, Resize + CenterCrop for eval,
a DataLoader with workers. Given its best chance: the backbone's own mean/std/interpolation from
timm's data config instead of the tutorial's hard-coded ImageNet values. After each epoch it is
evaluated on the val rows; the weights of the best val epoch (accuracy, ties -> lower val loss)
predict the test rows once, as the tutorial's `best_model_params_path` does.

    python benchmarks/baselines/tutorial_finetune.py --splits SPLITS.csv --model tf_efficientnet_lite0 \
        --weights W.safetensors --epochs 8 --out OUT.json [--threads T] [--seed S] [--workers W]

SPLITS.csv has columns path,label,split (train/val/test); relative paths are relative to the CSV's
folder. `--weights none` creates the model with random weights (smoke tests only). Runs in
visiontune's own venv: it needs torch, torchvision, timm, numpy and PIL, nothing from visiontune.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from --weights, never from a hub

import argparse
import copy
import csv
import platform
import random
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from common import (  # this folder is on sys.path: scripts run by path
    weights_check,
    write_result,
)
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

METHOD = "tutorial-finetune-all"


def read_splits(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{'train'|'val'|'test': [(absolute path, label), ...]} in file order."""
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            image = Path(row["path"])
            if not image.is_absolute():
                image = path.parent / image
            rows[row["split"].strip()].append((str(image.resolve()), row["label"]))
    return rows


class SplitDataset(Dataset):
    def __init__(self, items: list[tuple[str, str]], class_to_idx: dict[str, int], transform):
        self.items, self.class_to_idx, self.transform = items, class_to_idx, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        with Image.open(path) as image:
            image = image.convert("RGB")  # grayscale JPEGs too
        return self.transform(image), self.class_to_idx[label]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    splits = read_splits(Path(args.splits))
    labels = sorted({label for items in splits.values() for _, label in items})
    class_to_idx = {label: i for i, label in enumerate(labels)}

    started = time.perf_counter()
    pretrained = args.weights != "none"
    overlay = {"file": str(Path(args.weights).resolve())} if pretrained else None
    model = timm.create_model(args.model, pretrained=pretrained, pretrained_cfg_overlay=overlay)
    loaded = weights_check(model, args.weights)
    model.reset_classifier(len(labels))  # the tutorial's `model.fc = nn.Linear(num_ftrs, n)`
    config = timm.data.resolve_model_data_config(model)
    size = config["input_size"][-1]
    interpolation = transforms.InterpolationMode(config["interpolation"])
    normalize = transforms.Normalize(config["mean"], config["std"])
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(size, interpolation=interpolation), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), normalize,
        ]),
        "eval": transforms.Compose([
            transforms.Resize(round(size / 0.875), interpolation=interpolation), transforms.CenterCrop(size),
            transforms.ToTensor(), normalize,
        ]),
    }
    loaders = {
        split: DataLoader(SplitDataset(splits[split], class_to_idx, data_transforms["train" if split == "train" else "eval"]),
                          batch_size=args.batch_size, shuffle=split == "train", num_workers=args.workers,
                          persistent_workers=args.workers > 0 and split != "test")
        for split in ("train", "val", "test")
    }
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

    train_started = time.perf_counter()
    history, best, best_state = [], None, None
    for epoch in range(args.epochs):
        model.train()
        for inputs, targets in loaders["train"]:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
        scheduler.step()
        model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for inputs, targets in loaders["val"]:
                outputs = model(inputs)
                loss_sum += criterion(outputs, targets).item() * len(targets)
                correct += (outputs.argmax(1) == targets).sum().item()
        n_val = len(loaders["val"].dataset)
        accuracy, val_loss = correct / n_val, loss_sum / n_val
        history.append({"epoch": epoch + 1, "val_accuracy": accuracy, "val_loss": val_loss,
                        "elapsed_s": time.perf_counter() - started})
        if best is None or (accuracy, -val_loss) > (best["val_accuracy"], -best["val_loss"]):
            best, best_state = history[-1], copy.deepcopy(model.state_dict())
        print(f"  {METHOD} epoch {epoch + 1}/{args.epochs}: val acc {accuracy:.4f} loss {val_loss:.4f} "
              f"at {history[-1]['elapsed_s']:.1f}s", flush=True)
    train_s = time.perf_counter() - train_started

    model.load_state_dict(best_state)
    model.eval()
    predict_started = time.perf_counter()
    probs, y_true = [], []
    with torch.no_grad():
        for inputs, targets in loaders["test"]:
            probs.append(torch.softmax(model(inputs), 1))
            y_true.extend(targets.tolist())
    probs = torch.cat(probs).tolist() if probs else []
    ended = time.perf_counter()
    return {
        "method": METHOD, "model": args.model, "epochs": args.epochs, "seed": args.seed,
        "wall_s": ended - started, "train_s": train_s, "predict_s": ended - predict_started,
        "val_accuracy_per_epoch": [h["val_accuracy"] for h in history],
        "val_loss_per_epoch": [h["val_loss"] for h in history],
        "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
        "test": {"paths": [p for p, _ in splits["test"]], "y_true": y_true, "probs": probs},
        "labels": labels,
        "settings": {"batch_size": args.batch_size, "optimizer": "SGD lr 1e-3 momentum 0.9",
                     "scheduler": "StepLR(7, 0.1)", "size": size, "eval_resize": round(size / 0.875),
                     "interpolation": config["interpolation"], "mean": list(config["mean"]),
                     "std": list(config["std"]), "threads": torch.get_num_threads(), "workers": args.workers,
                     "pretrained": pretrained, "weights": overlay["file"] if overlay else None,
                     "weights_max_abs_diff_at_load": loaded,
                     "n": {split: len(items) for split, items in splits.items()}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "timm": timm.__version__, "numpy": np.__version__,
                     "platform": platform.platform()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", required=True, help="CSV with columns path,label,split")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name")
    parser.add_argument("--weights", required=True, help="local weights file (.safetensors/.pth), or 'none'")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers (the tutorial's 4, at most the core count)")
    parser.add_argument("--batch-size", type=int, default=4, help="the tutorial's 4")
    args = parser.parse_args()
    result = run(args)
    test_acc = write_result(args.out, result)
    print(f"RESULT {METHOD} {args.model} epochs={args.epochs} best_epoch={result['best_epoch']} "
          f"val_acc={result['best_val_accuracy']:.4f} test_acc={test_acc:.4f} n_test={len(result['test']['y_true'])} "
          f"wall_s={result['wall_s']:.1f} train_s={result['train_s']:.1f} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
