"""`visiontune benchmark`: the CLI over visiontune.bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from visiontune.errors import UserError

Opt = typer.Option
stdout = Console(highlight=False, soft_wrap=True)


def benchmark(
    model_or_run: Annotated[str, typer.Argument(help="A run directory, or a timm model name (random init unless --weights).")],
    device: Annotated[str, Opt(help="Comma-separated devices: cpu, cuda.")] = "cpu",
    batch_sizes: Annotated[str, Opt(help="Comma-separated batch sizes.")] = "1,10,50,100,500",
    train: Annotated[bool, Opt("--train", help="Also time training steps (forward, backward, optimizer step).")] = False,
    data: Annotated[str | None, Opt(help="Folder of images for the end-to-end timing (default: synthetic 500x375 JPEGs).")] = None,
    weights: Annotated[str | None, Opt(help="Weights file for a timm model name.")] = None,
    backend: Annotated[str | None, Opt(help="torch | onnx | openvino (default: chosen per device).")] = None,
    precision: Annotated[str | None, Opt(help="fp32 | bf16 (default: chosen per device).")] = None,
    quantize: Annotated[str | None, Opt(help="int8: ONNX Runtime static quantization.")] = None,
    threads: Annotated[int | None, Opt(help="CPU threads (default: the free cores).")] = None,
    workers: Annotated[int | None, Opt(help="Decoding worker processes (default: from the free cores).")] = None,
    repeats: Annotated[int, Opt(help="Timed repeats per row (the median is reported).")] = 3,
    json_out: Annotated[Path | None, Opt("--json", help="Also write the results as JSON to this file.")] = None,
) -> None:
    """Images/s and ms/image per device and batch size, model only and end to end with decoding."""
    from visiontune.bench.benchmark import benchmark as run_benchmark
    from visiontune.io import write_text_atomic

    result = run_benchmark(
        model_or_run, devices=_split(device, str, "--device"), batch_sizes=_split(batch_sizes, int, "--batch-sizes"),
        train=train, data=data, weights=weights, repeats=repeats, backend=backend, precision=precision,
        quantize=quantize, threads=threads, workers=workers,
    )
    print_benchmark(result)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2))
        stdout.print(f"written: {json_out}")


def print_benchmark(result: dict) -> None:
    stdout.print(f"[bold]{result['model']}[/bold] on {result['machine']['cpu']} ({result['machine']['cores']} cores), "
                 f"load average {result['load_average_before']}")
    for plan in result["plans"].values():
        stdout.print(f"plan {plan['description']}")
    table = Table()
    headers = ("device", "mode", "batch", "img/s model", "ms/img model", "img/s e2e", "ms/img e2e",
               "peak RSS MB", "CUDA max MB")
    for header in headers:
        table.add_column(header, justify="right")
    for row in result["rows"]:
        table.add_row(row["device"], row["mode"], str(row["batch_size"]), *(
            "-" if row[k] is None else f"{row[k]:.1f}" for k in
            ("images_per_s", "ms_per_image", "e2e_images_per_s", "e2e_ms_per_image", "peak_rss_mb", "cuda_max_allocated_mb")
        ))
    stdout.print(table)


def _split(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} takes a comma-separated list, not {text!r}") from None
    if not values:
        raise UserError(f"{option} is empty")
    return values
