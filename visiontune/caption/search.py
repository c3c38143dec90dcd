"""Batched beam search with a length penalty (pure torch): beam 1 is greedy decoding.

Hypotheses are ranked by their summed log-probability divided by ((5 + length) / 6) ** alpha (Wu et
al. 2016), so a longer caption is not lost to a short one only for having more words to pay for.
A beam that has ended keeps its score and extends with padding. `banned` ids (PAD, BOS, UNK) are
never generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generated:
    tokens: list[list[int]]  # per image: the words, EOS excluded
    attention: list[torch.Tensor]  # per image: [words, T] attention over the grid cells
    scores: list[float]  # the length-normalised log-probability


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def beam_search(decoder: nn.Module, memory: torch.Tensor, bos: int, eos: int, max_length: int, beam: int = 3,
                alpha: float = 0.7, banned: tuple[int, ...] = ()) -> Generated:
    batch = memory.shape[0]
    device = memory.device
    state = decoder.start(memory.repeat_interleave(beam, dim=0))
    tokens = torch.full((batch * beam, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(batch, beam, device=device)
    scores[:, 1:] = -float("inf")  # every beam starts as the same BOS: keep one until they differ
    finished = torch.zeros(batch * beam, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * beam, device=device)
    attention = []
    for _ in range(max_length - 1):
        logprobs, state, weights = decoder.step(state, tokens)
        logprobs = logprobs.float().clone()
        if banned:
            logprobs[:, list(banned)] = -float("inf")
        vocab = logprobs.shape[-1]
        # an ended beam extends only with EOS, at no cost, so its score stays as it was
        logprobs[finished] = -float("inf")
        logprobs[finished, eos] = 0.0
        grown_lengths = lengths[:, None] + (~finished)[:, None].float()
        total = scores.reshape(-1, 1) + logprobs
        ranked = total / length_penalty(grown_lengths, alpha)
        best = ranked.reshape(batch, -1).topk(beam, dim=1).indices  # [B, beam] over beam * vocab
        source = (best // vocab) + torch.arange(batch, device=device)[:, None] * beam
        source, word = source.reshape(-1), (best % vocab).reshape(-1)
        scores = total.reshape(-1)[source * vocab + word].reshape(batch, beam)
        lengths = grown_lengths[source, 0]
        was_finished = finished[source]
        finished = was_finished | (word == eos)
        tokens = torch.cat([tokens[source], word[:, None]], dim=1)
        attention = [a[source] for a in attention] + [weights[source]]
        state = decoder.reorder(state, source)
        if finished.all():
            break
    normalised = (scores.reshape(-1) / length_penalty(lengths, alpha)).reshape(batch, beam)
    pick = normalised.argmax(dim=1) + torch.arange(batch, device=device) * beam
    stacked = torch.stack(attention, dim=1)  # [B * beam, steps, T]
    out = Generated([], [], [])
    for row in pick.tolist():
        words = tokens[row, 1:].tolist()
        length = words.index(eos) if eos in words else len(words)
        out.tokens.append(words[:length])
        out.attention.append(stacked[row, :length].float().cpu())
        out.scores.append(float(normalised.reshape(-1)[row]))
    return out
