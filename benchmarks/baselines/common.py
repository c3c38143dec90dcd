"""What the baseline scripts share: the proof that the backbone holds the weights file, and the result file."""

from __future__ import annotations

import json
from pathlib import Path


def weights_check(model, weights: str) -> float | None:
    """Max |difference| between the model's tensors and the file's (backbone only): 0.0 means loaded."""
    if weights == "none":
        return None
    from safetensors.torch import load_file

    state, reference = model.state_dict(), load_file(weights)
    shared = [k for k in reference if k in state and state[k].shape == reference[k].shape
              and state[k].is_floating_point()]
    if not shared:
        raise SystemExit(f"no tensor of {weights} matches the model: wrong --model?")
    return max((state[k].float() - reference[k].float()).abs().max().item() for k in shared)


def write_result(out: str, result: dict) -> float:
    """Write `result` as JSON to `out`; returns its test accuracy (nan without test images) for the summary line."""
    import numpy as np

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result))
    y_true, probs = np.array(result["test"]["y_true"]), np.array(result["test"]["probs"])
    return float((probs.argmax(1) == y_true).mean()) if len(y_true) else float("nan")
