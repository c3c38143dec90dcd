"""Which regions of an image drove a run's prediction: Grad-CAM or LIME overlays, one PNG each.

Images go through the run's own evaluation preprocessing, so the overlay shows exactly what the
model saw; unreadable files are reported in their record, never raised, like everywhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

import torch

from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.paths import expand_image_paths
from visiontune.errors import UserError
from visiontune.explain.cam import gradcam
from visiontune.explain.lime import DEFAULT_SAMPLES, lime_map
from visiontune.explain.overlay import model_view, overlay, save_png
from visiontune.models.classifier_run import ClassifierRun
from visiontune.models.losses import probabilities

METHODS = ("gradcam", "lime")



def explain(
    run: ClassifierRun | str | Path,
    paths: Iterable[str | Path],
    method: str = "gradcam",
    target: str | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    num_samples: int = DEFAULT_SAMPLES,
    layer: str | None = None,
) -> list[dict]:
    """Write `<stem>_<method>.png` per image to `out_dir` (default RUN/explain) and return records.

    A record has `path`, `label` and `probability` (the prediction), `target` and
    `target_probability` (the class explained: `target`, or the prediction when None) and
    `overlay` (the PNG), or `path` and `skipped` (the reason) for a file that cannot be read.
    `num_samples` is LIME's neighbourhood size; `layer` overrides Grad-CAM's module name.
    """
    if method not in METHODS:
        raise UserError(f"unknown explanation method {method!r}; use one of {', '.join(METHODS)}")
    if not isinstance(run, ClassifierRun):
        run = ClassifierRun(run)
    labels = run.labels
    target_index = None if target is None else _class_index(target, labels)
    model, pre = run.load_model(), run.preprocessing
    transform, max_pixels = pre.eval_transform(), run.config.max_pixels
    out = Path(out_dir).expanduser() if out_dir is not None else run.dir / "explain"

    records = [{"path": str(path)} for path in expand_image_paths(list(paths))]
    names: set[str] = set()
    for start in range(0, len(records), batch_size):
        loaded = []
        for record in records[start : start + batch_size]:
            try:
                loaded.append((record, transform(load_rgb(record["path"], max_pixels))))
            except ImageLoadError as exc:
                record["skipped"] = str(exc)
        if not loaded:
            continue
        batch = torch.stack([tensor for _, tensor in loaded])
        with torch.no_grad():
            probs = torch.from_numpy(probabilities(model(batch).numpy(), run.metadata["loss"]))
        predicted = probs.argmax(dim=1).tolist()
        targets = predicted if target_index is None else [target_index] * len(loaded)
        views = model_view(batch, pre)
        if method == "gradcam":
            heat = gradcam(model, batch, targets, layer)
        else:
            heat = lime_map(model, views, targets, pre, num_samples, batch_size)
        for i, (record, _) in enumerate(loaded):
            name = _unique_name(Path(record["path"]).stem, method, names)
            png = save_png(overlay(views[i], heat[i]), out / name)
            record.update(
                label=labels[predicted[i]], probability=float(probs[i, predicted[i]]),
                target=labels[targets[i]], target_probability=float(probs[i, targets[i]]),
                overlay=str(png),
            )
    return records


def _class_index(name: str, labels: list[str]) -> int:
    if name in labels:
        return labels.index(name)
    close = difflib.get_close_matches(name, labels, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"unknown target class {name!r}.{hint} The run's classes: {', '.join(labels)}")


def _unique_name(stem: str, method: str, taken: set[str]) -> str:
    """`<stem>_<method>.png`, numbered when two inputs share a stem so that neither is overwritten."""
    name, n = f"{stem}_{method}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}_{method}.png"
    taken.add(name)
    return name
