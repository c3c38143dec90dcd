"""Proof that a baseline's backbone holds the weights file: shared by the baseline scripts."""

from __future__ import annotations


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
