"""LIME through the `lime` package: superpixels of what the model saw, switched off at random.

It needs only the model's outputs, so it explains any architecture, transformers included.
Hidden superpixels are filled with the normalisation mean, which the model sees as zero input:
filling with each superpixel's own mean (lime's default) leaves a flat bright patch unchanged,
and its evidence invisible.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from lime import lime_image
from torch import nn

from visiontune.data.transforms import Preprocessing

DEFAULT_SAMPLES = 500


def lime_map(
    model: nn.Module,
    images: np.ndarray,
    targets: list[int],
    preprocessing: Preprocessing,
    num_samples: int = DEFAULT_SAMPLES,
    batch_size: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """Evidence maps [B, H, W] in [0, 1] for `targets`, from uint8 model-input views [B, H, W, 3].

    Each pixel gets its superpixel's positive LIME weight, scaled by the image's largest one.
    """
    hide = tuple(round(255 * m) for m in preprocessing.mean)
    classify = _classifier(model, preprocessing)
    maps = []
    for image, target in zip(images, targets):
        explainer = lime_image.LimeImageExplainer(random_state=seed)
        # lime 0.2 draws a tqdm bar for every image and has no switch to turn it off.
        with mock.patch.object(lime_image, "tqdm", lambda rows: rows):
            found = explainer.explain_instance(
                image, classify, labels=(int(target),), top_labels=None, hide_color=hide,
                num_samples=num_samples, batch_size=batch_size, random_seed=seed,
            )
        per_segment = np.zeros(found.segments.max() + 1, dtype=np.float32)
        for segment, weight in found.local_exp[int(target)]:
            per_segment[segment] = max(weight, 0.0)
        heat = per_segment[found.segments]
        maps.append(heat / heat.max() if heat.max() > 0 else heat)
    return np.stack(maps).astype(np.float32)


def _classifier(model: nn.Module, preprocessing: Preprocessing):
    """lime's classifier_fn: uint8 [N, H, W, 3] views to class probabilities, as evaluation does."""
    device = next(model.parameters()).device
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)

    def classify(views: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(views)).to(device).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return model((batch - mean) / std).softmax(dim=1).cpu().numpy()

    return classify
