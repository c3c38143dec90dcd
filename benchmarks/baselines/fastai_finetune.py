"""Baseline: fastai's standard fine-tuning recipe on a split CSV, with the same timm backbone and weights.

fastai book's presizing recipe: `item_tfms=Resize(460)` (scaled as 460/224 * the model's input size)
and `batch_tfms=aug_transforms(size=SIZE, min_scale=0.75)`, train = the train rows, valid = the val
rows; `vision_learner(dls, MODEL, metrics=accuracy)` (fastai's own head, body/head split and the
backbone's timm mean/std), then `learn.fine_tune(epochs)` with fastai's defaults (freeze_epochs=1,
base_lr=2e-3, batch 64): one frozen epoch, then `epochs` unfrozen ones. The final model (fastai
keeps the last epoch) predicts the test rows once with `learn.get_preds(dl=dls.test_dl(test_df))`.

The local weights: `vision_learner` passes its extra keyword arguments through `create_timm_model`
to `timm.create_model(arch, pretrained=True, num_classes=0, ...)`, so
`pretrained_cfg_overlay=dict(file=WEIGHTS)` makes timm load the file instead of the hub, with
everything else fastai does unchanged. HF_HUB_OFFLINE=1 makes any hub access fail loudly, and
the loaded body is compared with the file (`weights_max_abs_diff_at_load`, 0.0 when loaded).

fastai runs in its own venv so that it cannot change visiontune's: `--setup-venv` creates it
(/tmp/fastai-venv by default) reusing the main venv's torch/torchvision/timm; run with a python
that lacks fastai, the script creates that venv if needed and re-runs itself there.

    python benchmarks/baselines/fastai_finetune.py --setup-venv [--venv /tmp/fastai-venv]
    /tmp/fastai-venv/bin/python benchmarks/baselines/fastai_finetune.py --splits SPLITS.csv \
        --model tf_efficientnet_lite0 --weights W.safetensors --epochs 8 --out OUT.json [--threads T] [--seed S]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from --weights, never from a hub

import argparse
import csv
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import (  # this folder is on sys.path: scripts run by path
    weights_check,
    write_result,
)

METHOD = "fastai-fine_tune"
FASTAI_SPEC = "fastai==2.8.12"  # requires torch>=1.10,<3: fine with the main venv's torch 2.14
DEFAULT_VENV = "/tmp/fastai-venv"


def ensure_fastai_venv(venv: Path) -> Path:
    """A venv with fastai that reuses this interpreter's site-packages (torch, torchvision, timm, numpy...).

    A .pth file puts the main venv's site-packages on the new venv's path (after its own), and pip
    installs under constraints = the main venv's `pip freeze`, so it only adds what is missing
    (fastai, fastcore, fasttransform, plum-dispatch, pandas, spacy...) and never another torch.
    Nothing is written into the main venv.
    """
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", "import fastai.vision.all"], capture_output=True).returncode == 0:
        return python
    import site

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    main_site = next(p for p in site.getsitepackages() if Path(p, "torch").is_dir())
    (venv / "lib" / version / "site-packages" / "zz_shared_torch.pth").write_text(f"{main_site}\n")
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    constraints = venv / "constraints.txt"
    constraints.write_text("".join(f"{line}\n" for line in freeze.splitlines()
                                   if "==" in line and not line.lower().startswith("visiontune")))
    subprocess.run([python, "-m", "pip", "install", "-q", "-c", str(constraints), FASTAI_SPEC], check=True)
    return python


def read_splits(path: Path):
    """A DataFrame path,label,split with absolute paths (relative ones are relative to the CSV's folder)."""
    import pandas as pd

    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        image = Path(row["path"])
        row["path"] = str((image if image.is_absolute() else path.parent / image).resolve())
        row["split"] = row["split"].strip()
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def run(args: argparse.Namespace) -> dict:
    import fastai
    import fastcore
    import numpy as np
    import timm
    import torch
    import torchvision
    from fastai.vision.all import (
        Callback,
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Resize,
        accuracy,
        aug_transforms,
        set_seed,
        vision_learner,
    )

    set_seed(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    df = read_splits(Path(args.splits))
    labels = sorted(df["label"].unique())
    train_valid = df[df["split"].isin(["train", "val"])].reset_index(drop=True)
    train_valid["is_valid"] = train_valid["split"] == "val"
    test_df = df[df["split"] == "test"].reset_index(drop=True)

    # the timm config, read without weights, gives the size the presizing recipe is scaled to
    size = timm.data.resolve_model_data_config(timm.create_model(args.model, pretrained=False))["input_size"][-1]
    presize = round(size * 460 / 224)
    n_train = int((~train_valid["is_valid"]).sum())
    batch_size = min(args.batch_size, n_train)  # fastai drops the last partial train batch: keep >= 1 batch

    class EpochLog(Callback):  # fine_tune is two fits and the Recorder resets between them
        order = 60

        def __init__(self):
            self.rows = []

        def after_epoch(self):
            row = list(self.recorder.log)  # [epoch, train_loss, valid_loss, accuracy, time]
            self.rows.append(row)
            print(f"  {METHOD} epoch {len(self.rows) - 1} ({'frozen' if len(self.rows) == 1 else 'unfrozen'}): "
                  f"train loss {row[1]:.4f} val loss {row[2]:.4f} val acc {row[3]:.4f} "
                  f"at {time.perf_counter() - started:.1f}s", flush=True)

    started = time.perf_counter()
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=labels)),  # ImageBlock opens as RGB
                       get_x=ColReader("path"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                       item_tfms=Resize(presize), batch_tfms=aug_transforms(size=size, min_scale=0.75))
    loader_args = {} if args.workers is None else {"num_workers": args.workers}
    dls = dblock.dataloaders(train_valid, bs=batch_size, **loader_args)
    pretrained = args.weights != "none"
    overlay = {"pretrained_cfg_overlay": {"file": str(Path(args.weights).resolve())}} if pretrained else {}
    learn = vision_learner(dls, args.model, metrics=accuracy, pretrained=pretrained, **overlay)
    loaded = weights_check(learn.model[0].model, args.weights)
    log = EpochLog()
    train_started = time.perf_counter()
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.epochs, cbs=[log])  # freeze_epochs=1, base_lr=2e-3: fastai's defaults
    train_s = time.perf_counter() - train_started

    predict_started = time.perf_counter()
    test_dl = dls.test_dl(test_df)
    with learn.no_bar():
        probs, _ = learn.get_preds(dl=test_dl)
    ended = time.perf_counter()

    val_acc = [float(row[3]) for row in log.rows]
    val_loss = [float(row[2]) for row in log.rows]
    best = max(range(len(val_acc)), key=lambda i: (val_acc[i], -val_loss[i]))
    class_to_idx = {label: i for i, label in enumerate(labels)}
    return {
        "method": METHOD, "model": args.model, "epochs": args.epochs, "seed": args.seed,
        "wall_s": ended - started, "train_s": train_s, "predict_s": ended - predict_started,
        "val_accuracy_per_epoch": val_acc, "val_loss_per_epoch": val_loss,
        "train_loss_per_epoch": [float(row[1]) for row in log.rows],
        "epochs_note": "fine_tune(N) = 1 frozen epoch (index 0) + N unfrozen; the test predictions use the last",
        "best_epoch_index": best, "best_val_accuracy": val_acc[best], "last_val_accuracy": val_acc[-1],
        "test": {"paths": test_df["path"].tolist(), "y_true": [class_to_idx[v] for v in test_df["label"]],
                 "probs": probs.float().tolist()},
        "labels": labels,
        "settings": {"batch_size": batch_size, "requested_batch_size": args.batch_size,
                     "item_tfms": f"Resize({presize})", "batch_tfms": f"aug_transforms(size={size}, min_scale=0.75)",
                     "fine_tune": "freeze_epochs=1, base_lr=2e-3 (defaults)", "threads": torch.get_num_threads(),
                     "workers": dls.train.num_workers, "pretrained": pretrained,
                     "weights": overlay["pretrained_cfg_overlay"]["file"] if overlay else None,
                     "weights_max_abs_diff_at_load": loaded,
                     "normalize": [{"mean": t.mean.flatten().tolist(), "std": t.std.flatten().tolist()}
                                   for t in dls.after_batch.fs if type(t).__name__ == "Normalize"],
                     "n": {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")}},
        "versions": {"python": platform.python_version(), "fastai": fastai.__version__,
                     "fastcore": fastcore.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "timm": timm.__version__, "numpy": np.__version__,
                     "platform": platform.platform()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup-venv", action="store_true", help="create the fastai venv and exit")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="the fastai venv, created if this python lacks fastai")
    parser.add_argument("--splits", help="CSV with columns path,label,split")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name")
    parser.add_argument("--weights", help="local weights file (.safetensors/.pth), or 'none'")
    parser.add_argument("--epochs", type=int, default=8, help="unfrozen epochs after fastai's 1 frozen epoch")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: fastai's)")
    parser.add_argument("--batch-size", type=int, default=64, help="fastai's default 64 (capped at the train size)")
    args = parser.parse_args()
    if args.setup_venv:
        print(ensure_fastai_venv(Path(args.venv)))
        return
    if not (args.splits and args.weights and args.out):
        parser.error("--splits, --weights and --out are required")
    try:
        import fastai  # noqa: F401
    except ImportError:
        python = ensure_fastai_venv(Path(args.venv))
        os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
    result = run(args)
    test_acc = write_result(args.out, result)
    print(f"RESULT {METHOD} {args.model} epochs=1+{args.epochs} last_val_acc={result['last_val_accuracy']:.4f} "
          f"best_val_acc={result['best_val_accuracy']:.4f}@{result['best_epoch_index']} test_acc={test_acc:.4f} "
          f"n_test={len(result['test']['y_true'])} wall_s={result['wall_s']:.1f} train_s={result['train_s']:.1f} -> {args.out}",
          flush=True)


if __name__ == "__main__":
    main()
