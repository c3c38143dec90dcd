"""`visiontune predict`'s inference paths against the naive per-image loop, in one process.

    python benchmarks/predict_vs_naive.py [--run RUN] [--scale S] [--md section.md] [--json out.json]
    python benchmarks/predict_vs_naive.py --run RUN --rounds 5 [--scale S] [--json out.json]

Without --run, a tf_efficientnet_lite0 run is trained first on hymenoptera from the shared
weights (3 frozen epochs, about two minutes). The images are hymenoptera's val folder (153),
listed --repeat times. Throughput is marginal: each path is timed from its first batch out (the
naive loop: from its second image), so start-up (model load, ONNX export, worker processes) is
excluded. The naive loop is what one writes first: open, transform, `model(x[None])`, fp32 NCHW, at
2 torch threads and at 1. Every path's val predictions are compared with the naive loop's
(argmax agreement, largest probability difference) and scored against the folder labels.
"+ draft" paths decode JPEGs at the smallest DCT scale covering the resize target (what
`visiontune predict` does); hymenoptera's photos are mostly too small for it (short side
256-383 px against a 256 px target), so `--scale 2` (or 4) first writes copies S times the size
(JPEG quality 95), as camera-size photos would be, and every path then reads those.

The naive loop itself moves by 10-30% between runs on a shared VM, so one table's ratio near 3x
says little. `--rounds N` times only the two naive loops and the default plan, N times in turn,
and takes each round's ratio against the faster naive loop of the same round; the median and the
lowest of those ratios are the robust reading.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import visiontune
from visiontune.bench.benchmark import machine
from visiontune.data.images import load_rgb
from visiontune.inference.engine import (
    forward,
    iter_logits,
    load_for_inference,
    plan_inference,
    prepare_model,
)

SHARED = Path("/work/shared")
VARIANTS = {  # name: (plan options, draft decoding); everything else is the automatic CPU plan
    "torch fp32": ({"backend": "torch"}, False),
    "torch bf16": ({"backend": "torch", "precision": "bf16"}, False),
    "onnx fp32, exact decode": ({"backend": "onnx"}, False),
    "onnx fp32 + draft": ({"backend": "onnx"}, True),
    "onnx int8 (--quantize int8)": ({"quantize": "int8"}, False),
    "onnx int8 + draft": ({"quantize": "int8"}, True),
    "default plan + draft (the default)": ({}, True),
    "openvino fp32 + draft": ({"backend": "openvino"}, True),
    "openvino fp32 + draft, float batches (before uint8)": ({"backend": "openvino"}, True),
    "openvino bf16 + draft (--precision bf16)": ({"backend": "openvino", "precision": "bf16"}, True),
}
FLOAT_BATCHES = {"openvino fp32 + draft, float batches (before uint8)"}  # workers normalise, as before
CEILINGS = {  # model only, on tensors decoded beforehand, every thread on the model
    "onnx fp32, model only (decoded beforehand)": {"backend": "onnx"},
    "openvino fp32, model only (decoded beforehand)": {"backend": "openvino"},
    "openvino bf16, model only (decoded beforehand)": {"backend": "openvino", "precision": "bf16"},
}


def main() -> None:
    args = _parse()
    run = visiontune.load_run(args.run) if args.run else _train(args)
    val = sorted(str(p) for p in (args.data / "val").rglob("*.jpg"))
    truth = np.array([run.labels.index(Path(p).parent.name) for p in val])
    if args.scale != 1:
        val = _scaled_copies(val, args.scale, args.data)
    paths = val * args.repeat
    transform, max_pixels = run.preprocessing.eval_transform(), run.config.max_pixels
    load_before = os.getloadavg()
    if args.rounds:
        return _rounds(args, run, paths, transform, max_pixels, load_before)

    results = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        results[f"naive loop, {threads} thread(s)"] = _naive(run, paths, transform, max_pixels) | {
            "plan": f"per image, fp32 NCHW, {threads} thread(s), no workers"}
    for name, (options, draft) in VARIANTS.items():
        plan = plan_inference("cpu", threads=args.threads, workers=args.workers, **options)
        model, plan = load_for_inference(run, plan)  # exports (and calibrates) outside the timing
        draft_size = run.preprocessing.resize_size if draft else None
        preprocessing = None if name in FLOAT_BATCHES else run.preprocessing  # as `predict` passes it
        results[name] = _planned(model, plan, paths, transform, max_pixels, draft_size, preprocessing) | {
            "plan": _label(plan, model, draft, preprocessing)}
    # The ceiling of each backend: its model on tensors decoded beforehand, every thread on the
    # model. Where this is under 3x the naive loop, no decoding trick can reach 3x with it.
    tensors = [transform(load_rgb(path, max_pixels)) for path in paths]
    for name, options in CEILINGS.items():
        plan = plan_inference("cpu", threads=args.threads or os.cpu_count(), workers=0, **options)
        model, plan = load_for_inference(run, plan)
        results[name] = _model_only(model, plan, tensors) | {"plan": plan.describe() + ", no decoding timed"}
    load_after = os.getloadavg()

    reference, single = results["naive loop, 2 thread(s)"], results["naive loop, 1 thread(s)"]
    n = len(val)
    for result in results.values():
        result["speedup"] = result["images_per_s"] / reference["images_per_s"]
        result["speedup_1_thread"] = result["images_per_s"] / single["images_per_s"]
        probs, ref = _softmax(result["logits"][:n]), _softmax(reference["logits"][:n])
        result["argmax_agreement"] = float((probs.argmax(1) == ref.argmax(1)).mean())
        result["max_abs_prob_diff"] = float(np.abs(probs - ref).max())
        result["val_accuracy"] = float((probs.argmax(1) == truth).mean())
    text = _markdown(args, run, results, load_before, load_after, len(paths))
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({k: {f: v for f, v in r.items() if f != "logits"} for k, r in results.items()},
                                        indent=2))


def _rounds(args, run, paths, transform, max_pixels, load_before) -> None:
    """Naive loops and the default plan in turn, `args.rounds` times: per-round ratios."""
    model, plan = load_for_inference(run, plan_inference("cpu", threads=args.threads, workers=args.workers),
                                     fallback=True)
    rounds = []
    for _ in range(args.rounds):
        naive = {}
        for threads in (2, 1):
            torch.set_num_threads(threads)
            naive[threads] = _naive(run, paths, transform, max_pixels)["images_per_s"]
        planned = _planned(model, plan, paths, transform, max_pixels, run.preprocessing.resize_size,
                           run.preprocessing)["images_per_s"]
        rounds.append({"naive_2_threads": naive[2], "naive_1_thread": naive[1], "default_plan": planned,
                       "ratio_to_faster_naive": planned / max(naive.values())})
    ratios = [r["ratio_to_faster_naive"] for r in rounds]
    summary = {"plan": _label(plan, model, True, run.preprocessing), "images": len(paths), "scale": args.scale,
               "rounds": rounds, "median_ratio": float(np.median(ratios)), "lowest_ratio": min(ratios),
               "load_before": load_before, "load_after": os.getloadavg(), "machine": machine()}
    print(f"default plan: {summary['plan']}; {len(paths)} images")
    print("| round | naive, 2 threads | naive, 1 thread | default plan | ratio to the faster naive loop |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['naive_2_threads']:.1f} | {r['naive_1_thread']:.1f} | {r['default_plan']:.1f} | "
              f"{r['ratio_to_faster_naive']:.2f}x |")
    print(f"median {summary['median_ratio']:.2f}x, lowest {summary['lowest_ratio']:.2f}x; "
          f"load average before {_fmt(load_before)}, after {_fmt(summary['load_after'])}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def _label(plan, model, draft: bool, preprocessing) -> str:
    """The plan as a row shows it: with draft decoding, and uint8 batches where the model takes them."""
    uint8 = preprocessing is not None and getattr(model, "takes_uint8", False)
    return plan.describe() + (", draft decode" if draft else "") + (", uint8 batches" if uint8 else "")


def _naive(run, paths, transform, max_pixels) -> dict:
    model = run.load_model("best")
    logits, start = [], None
    with torch.inference_mode():
        for path in paths:
            logits.append(model(transform(load_rgb(path, max_pixels))[None]).numpy()[0])
            start = start or time.perf_counter()  # the first image is warm-up
    seconds = time.perf_counter() - start
    return {"images_per_s": (len(paths) - 1) / seconds, "logits": np.array(logits)}


def _planned(model, plan, paths, transform, max_pixels, draft_size, preprocessing) -> dict:
    logits, counted, start = [], 0, None
    for batch in iter_logits(model, transform, paths, max_pixels=max_pixels, plan=plan, draft_size=draft_size,
                             preprocessing=preprocessing):
        logits.append(batch.logits)
        if start is None:
            start = time.perf_counter()  # the first batch carries the start-up
        else:
            counted += len(batch.paths)
    return {"images_per_s": counted / (time.perf_counter() - start), "logits": np.concatenate(logits)}


def _model_only(model, plan, tensors: list[torch.Tensor]) -> dict:
    model = prepare_model(model, plan)
    batches = [torch.stack(tensors[i:i + plan.batch_size]) for i in range(0, len(tensors), plan.batch_size)]
    logits = [forward(model, batches[0], plan)]  # warm-up, not timed
    start = time.perf_counter()
    logits += [forward(model, batch, plan) for batch in batches[1:]]
    counted = len(tensors) - len(batches[0])
    return {"images_per_s": counted / (time.perf_counter() - start), "logits": np.concatenate(logits)}


def _scaled_copies(paths: list[str], scale: float, data: Path) -> list[str]:
    """Copies `scale` times the size (bicubic, JPEG quality 95) under a cache folder, made once."""
    folder = Path("runs") / f"bench-predict-scaled-x{scale:g}"
    copies = []
    for path in paths:
        target = folder / Path(path).relative_to(data)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            image = load_rgb(path, 10**9)
            image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC).save(
                target, quality=95)
        copies.append(str(target))
    return copies


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()


def _train(args):
    return visiontune.fit(
        str(args.data), model="tf_efficientnet_lite0", weights=str(args.weights), epochs=3, freeze_epochs=3,
        augment="none", report=False, out=str(args.out),
    )


def _markdown(args, run, results, load_before, load_after, n_images) -> str:
    import onnxruntime

    info = machine()
    lines = [
        "## Fast inference: predict paths vs the naive per-image loop (issues #5, 19)", "",
        f"`python benchmarks/predict_vs_naive.py{' --run RUN' if args.run else ''} --repeat {args.repeat}"
        f"{f' --scale {args.scale:g}' if args.scale != 1 else ''}` on "
        f"{info['cpu']}, {info['cores']} cores ({platform.python_version()}, torch {info['torch']}, onnxruntime "
        f"{onnxruntime.__version__}); model `{run.metadata['model']}` trained on hymenoptera with the shared "
        f"weights; {n_images} images (val x {args.repeat}{f', copies {args.scale:g}x the size' if args.scale != 1 else ''}); marginal throughput (start-up excluded). "
        f"Load average before {_fmt(load_before)}, after {_fmt(load_after)}"
        + (" (before: busy, other processes were running)." if load_before[0] > 0.5 else " (quiet before the run)."), "",
        ("| path | plan | images/s | vs naive, 2 threads | vs naive, 1 thread | argmax agreement with naive "
         "| max abs prob diff | val accuracy |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['plan']} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | {r['speedup_1_thread']:.2f}x | "
                     f"{r['argmax_agreement']:.3f} | {r['max_abs_prob_diff']:.2g} | {r['val_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def _fmt(load: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.2f}" for v in load)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="An existing lite0 hymenoptera run (else one is trained).")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-predict-lite0"), help="Where to train the run.")
    parser.add_argument("--repeat", type=int, default=1, help="Times the val folder is listed.")
    parser.add_argument("--scale", type=float, default=1, help="Read copies this many times the size (JPEG q95).")
    parser.add_argument("--threads", type=int, help="Threads for the planned paths (default: the free cores).")
    parser.add_argument("--workers", type=int, help="Decode workers for the planned paths (default: from free cores).")
    parser.add_argument("--rounds", type=int, default=0,
                        help="Only the naive loops and the default plan, this many times in turn (per-round ratios).")
    parser.add_argument("--md", type=Path, help="Also write the markdown section to this file.")
    parser.add_argument("--json", type=Path, help="Also write the numbers as JSON.")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
