"""Stress tests: accuracy under named, deterministic perturbations, to see what a model relies on.

Each perturbation removes one kind of evidence and keeps the rest; the accuracy it costs is how
much the model leaned on that evidence:

- `none`: the clean reference, through the same pipeline as every other row.
- `grayscale`, `invert`: colour reliance. Grayscale removes hue and keeps luminance; inversion
  keeps every edge and shape but turns each colour into its complement.
- `edges`: shape alone. A sketch (dark outlines on white) has no colour and no texture.
- `patch_shuffle`: texture versus shape. Permuting a 4x4 grid of tiles keeps local texture and
  colour statistics but destroys global shape; a model that holds up here and fails on `edges`
  reads texture (the classic ImageNet bias) more than shape.
- `blur`, `noise`, `jpeg`: fine detail and image quality. Blur removes high frequencies, noise
  adds them, JPEG at quality 10 adds block artefacts as a cheap camera or upload would.
- `mask_centre`, `mask_background`: context versus object. Greying the central box hides the
  object of a centred photo; greying everything else hides the context (a cow on grass). A model
  that does better without the object than without the background is reading the background.

Every perturbation is a pure function of the image (any noise comes from a fixed seed), so a rerun
gives the same numbers. They are module-level functions, so that decoding workers can pickle them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from visiontune.errors import UserError
from visiontune.evaluation import metrics as m
from visiontune.inference.engine import InferencePlan, iter_logits
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.losses import probabilities

SEED = 0
GRID = 4  # patch_shuffle tiles per side
BLUR_FRACTION = 0.02  # Gaussian blur radius as a share of the shorter side
NOISE_SIGMA = 25.0  # on the 0-255 scale
JPEG_QUALITY = 10
GREY = 128
NOTABLE_DROP = 0.1  # an accuracy drop the reading mentions


def unchanged(image: Image.Image) -> Image.Image:
    return image


def grayscale(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image)


def edges(image: Image.Image) -> Image.Image:
    """Dark outlines on white, like a pencil sketch."""
    return ImageOps.invert(ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES)).convert("RGB")


def blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(max(1.0, BLUR_FRACTION * min(image.size))))


def noise(image: Image.Image) -> Image.Image:
    rng = np.random.default_rng(SEED)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, NOISE_SIGMA, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def patch_shuffle(image: Image.Image) -> Image.Image:
    """The GRID x GRID tiles in a fixed random order; a remainder strip (sizes not divisible by
    GRID) stays where it is."""
    pixels = np.asarray(image)
    tile_h, tile_w = image.height // GRID, image.width // GRID
    if tile_h == 0 or tile_w == 0:
        return image.copy()
    tiles = [pixels[r * tile_h:(r + 1) * tile_h, c * tile_w:(c + 1) * tile_w] for r in range(GRID) for c in range(GRID)]
    order = np.random.default_rng(SEED).permutation(len(tiles))
    shuffled = pixels.copy()
    for k, source in enumerate(order):
        r, c = divmod(k, GRID)
        shuffled[r * tile_h:(r + 1) * tile_h, c * tile_w:(c + 1) * tile_w] = tiles[source]
    return Image.fromarray(shuffled)


def mask_centre(image: Image.Image) -> Image.Image:
    """A grey box over the central half of each side."""
    pixels = np.array(image)
    pixels[_centre(image)] = GREY
    return Image.fromarray(pixels)


def mask_background(image: Image.Image) -> Image.Image:
    """Grey everywhere except the central half of each side."""
    pixels = np.full_like(np.asarray(image), GREY)
    box = _centre(image)
    pixels[box] = np.asarray(image)[box]
    return Image.fromarray(pixels)


def _centre(image: Image.Image) -> tuple[slice, slice]:
    top, left = image.height // 4, image.width // 4
    return slice(top, top + image.height // 2), slice(left, left + image.width // 2)


PERTURBATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": unchanged,
    "grayscale": grayscale,
    "invert": invert,
    "edges": edges,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "patch_shuffle": patch_shuffle,
    "mask_centre": mask_centre,
    "mask_background": mask_background,
}


class Perturbed:
    """`transform(perturb(image))`: a picklable transform for decoding workers."""

    def __init__(self, perturb: Callable[[Image.Image], Image.Image], transform: Callable) -> None:
        self.perturb, self.transform = perturb, transform

    def __call__(self, image: Image.Image):
        return self.transform(self.perturb(image))


def stress_test(
    run: ClassifierRun,
    samples: list[tuple[str, int]],
    model,
    plan: InferencePlan,
    perturbations: Sequence[str] | None = None,
) -> dict:
    """Accuracy (95% bootstrap CI), macro-F1 and the drop from clean of `run`'s loaded `model` on
    `samples` (path, class index) under each perturbation (default all), and a one-sentence reading.

    `none` is always measured first: it is the clean accuracy the drops are taken from.
    """
    names = list(PERTURBATIONS) if perturbations is None else ["none", *(n for n in perturbations if n != "none")]
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise UserError(f"unknown perturbation(s) {', '.join(unknown)}; use {', '.join(PERTURBATIONS)}")
    target_of = dict(samples)
    paths = [p for p, _ in samples]
    eval_transform = run.preprocessing.eval_transform()
    chance = float(np.bincount([t for _, t in samples]).max() / len(samples))  # always the commonest class
    rows = []
    for name in names:
        transform = Perturbed(PERTURBATIONS[name], eval_transform)
        kept, logits = [], []
        for batch in iter_logits(model, transform, paths, max_pixels=run.config.max_pixels, plan=plan):
            kept += batch.paths
            logits.append(batch.logits.reshape(len(batch.paths), -1))
        if not kept:
            raise UserError("no readable images to stress-test")
        y_true = np.array([target_of[p] for p in kept], dtype=int)
        probs = probabilities(np.concatenate(logits), run.metadata["loss"])
        scores = m.classification_metrics(y_true, probs, run.labels)
        interval = m.bootstrap_intervals(y_true, probs.argmax(axis=1), len(run.labels))["accuracy"]
        rows.append({"name": name, "accuracy": scores["accuracy"], "ci": interval,
                     "f1_macro": scores["f1_macro"], "images": len(kept)})
    clean = rows[0]["accuracy"]
    for row in rows:
        row["drop"] = clean - row["accuracy"]
    return {"perturbations": rows, "clean_accuracy": clean, "chance": chance, "reading": reading(rows)}


def reading(rows: list[dict]) -> str:
    """One sentence on what the biggest drops say the model relies on."""
    drop = {row["name"]: row["drop"] for row in rows}
    hurts = {name for name, value in drop.items() if value >= NOTABLE_DROP}
    if not hurts:
        return f"Accuracy holds under every perturbation (no drop of {NOTABLE_DROP:.0%} or more)."
    biggest = sorted(hurts, key=lambda name: -drop[name])[:3]
    findings = []
    if hurts & {"grayscale", "invert"}:
        findings.append("relies on colour")
    if "edges" in hurts and "patch_shuffle" in drop and "patch_shuffle" not in hurts:
        findings.append("relies on texture more than shape")
    if "patch_shuffle" in hurts and "edges" in drop and "edges" not in hurts:
        findings.append("relies on shape more than texture")
    if "mask_background" in hurts and "mask_centre" in drop and "mask_centre" not in hurts:
        findings.append("relies on the background (context) more than the centre")
    if "mask_centre" in hurts and "mask_background" in drop and "mask_background" not in hurts:
        findings.append("relies on the centre (the object) more than the background")
    if hurts & {"blur", "noise", "jpeg"}:
        findings.append("is sensitive to image quality (" + ", ".join(sorted(hurts & {"blur", "noise", "jpeg"})) + ")")
    listed = ", ".join(f"{name} (-{drop[name]:.2f})" for name in biggest)
    return f"Biggest drops: {listed}" + (f"; the model {' and '.join(findings)}." if findings else ".")
