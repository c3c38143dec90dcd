"""`visiontune adapt`: a thin layer over visiontune.adapt.workflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)


def adapt(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `visiontune train`.")],
    target: Annotated[Path, Opt(help="Target-domain images: a folder (a split folder's test/ is never opened) "
                                     "or a CSV file.")],
    out: Annotated[Path, Opt(help="The new run directory (must not exist, or be empty).")],
    method: Annotated[str, Opt(help="adabn: re-estimate BatchNorm statistics on the target images; mcc: fine-tune "
                                    "with Minimum Class Confusion on unlabelled target images; finetune: train on "
                                    "labelled target images; mixed: source and labelled target images together.")],
    target_labels: Annotated[Path | None, Opt(help="Labelled target images (finetune, mixed): class folders or a "
                                                   "CSV file of path,label.")] = None,
    shots: Annotated[int | None, Opt(help="Labelled target images per class, drawn seeded (default: all).")] = None,
    epochs: Annotated[int, Opt(help="Training epochs (mcc, finetune, mixed).")] = 5,
    lr: Annotated[float, Opt(help="AdamW learning rate of the whole network, cosine-decayed.")] = 1e-4,
    trade_off: Annotated[float, Opt(help="Weight of the MCC loss beside the source cross-entropy.")] = 1.0,
    seed: Annotated[int, Opt(help="Seed of the draws, the data order and the augmentation.")] = 0,
    batch_size: Annotated[int | None, Opt(help="Training batch size (default: the run's).")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    workers: Annotated[int | None, Opt(help="Decoding worker processes; default from free cores.")] = None,
) -> None:
    """Adapt a trained run to a new domain and write the result as a new run directory (with its lineage)."""
    from visiontune.adapt.workflow import adapt as adapt_run

    written = adapt_run(run_dir, target, method, out, target_labels=target_labels, shots=shots, epochs=epochs, lr=lr,
                        trade_off=trade_off, seed=seed, batch_size=batch_size, device=device, workers=workers)
    stdout.print(f"written: {written}; evaluate it with: visiontune evaluate {written}", markup=False)
