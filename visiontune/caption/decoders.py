"""Caption decoders over a grid of encoder features (pure torch).

Both take `memory` [B, T, C]: T grid cells (T = 1 for pooled features) of C channels, C taken from
the backbone's feature_info, so the projection to the decoder width always fits. Both expose the
same step interface to the search (`start`, `step`, `reorder`), and return the cross-attention
over the grid cells for every generated word (the report's attention maps).

- `TransformerCaptioner`: pre-norm Transformer decoder layers with causal self-attention and
  cross-attention over the projected grid, which gets learned 2-D position embeddings (a row and a
  column embedding added), so the decoder knows where each cell is.
- `LSTMCaptioner`: Show, Attend and Tell (Xu et al. 2015): an LSTM whose input is the previous word
  and a soft-attention context of the grid, gated by the hidden state; its state starts from the
  mean of the grid.
"""

from __future__ import annotations

import torch
from torch import nn


class GridProjection(nn.Module):
    """Encoder channels -> decoder width, plus learned row / column embeddings of each cell."""

    def __init__(self, channels: int, width: int, grid: tuple[int, int], dropout: float) -> None:
        super().__init__()
        self.grid = grid
        self.project = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, width), nn.Dropout(dropout))
        self.rows = nn.Parameter(torch.zeros(grid[0], 1, width))
        self.cols = nn.Parameter(torch.zeros(1, grid[1], width))
        nn.init.normal_(self.rows, std=0.02)
        nn.init.normal_(self.cols, std=0.02)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        position = (self.rows + self.cols).reshape(1, -1, self.rows.shape[-1])
        return self.project(memory) + position


class DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward; keeps the cross-attention weights."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: torch.Tensor,
                padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norms[0](x)
        x = x + self.dropout(self.self_attn(h, h, h, attn_mask=causal, key_padding_mask=padding,
                                            need_weights=False)[0])
        attended, weights = self.cross_attn(self.norms[1](x), memory, memory, need_weights=True)
        x = x + self.dropout(attended)
        return x + self.dropout(self.feed_forward(self.norms[2](x))), weights


class TransformerCaptioner(nn.Module):
    def __init__(self, vocab_size: int, channels: int, grid: tuple[int, int], width: int = 256, layers: int = 2,
                 heads: int = 4, max_length: int = 32, dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not a multiple of its {heads} attention heads")
        self.pad_id = pad_id
        self.grid_projection = GridProjection(channels, width, grid, dropout)
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.positions = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.normal_(self.positions, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: logits [B, L, V] for the next word after each of `tokens` [B, L], and the
        last layer's cross-attention [B, L, T] (averaged over heads)."""
        return self._decode(self.grid_projection(memory), tokens)

    def _decode(self, grid: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.positions[:, :length]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), diagonal=1)
        padding = tokens == self.pad_id
        padding[:, 0] = False  # the first token is always BOS; a row of all-masked keys would be NaN
        weights = None
        for layer in self.layers:
            x, weights = layer(x, grid, causal, padding)
        return self.out(self.norm(x)), weights

    def start(self, memory: torch.Tensor) -> dict:
        return {"grid": self.grid_projection(memory)}

    def step(self, state: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Log-probabilities of the next word after the prefixes `tokens` [B, t]."""
        logits, weights = self._decode(state["grid"], tokens)
        return logits[:, -1].log_softmax(-1), state, weights[:, -1]

    @staticmethod
    def reorder(state: dict, index: torch.Tensor) -> dict:
        return {"grid": state["grid"][index]}


class LSTMCaptioner(nn.Module):
    def __init__(self, vocab_size: int, channels: int, grid: tuple[int, int], width: int = 256,
                 dropout: float = 0.1, pad_id: int = 0, **_: object) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.grid_projection = GridProjection(channels, width, grid, dropout)
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.init_h, self.init_c = nn.Linear(width, width), nn.Linear(width, width)
        self.att_grid, self.att_hidden = nn.Linear(width, width), nn.Linear(width, width)
        self.att_score = nn.Linear(width, 1)
        self.gate = nn.Linear(width, width)
        self.cell = nn.LSTMCell(2 * width, width)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, vocab_size)

    def start(self, memory: torch.Tensor) -> dict:
        grid = self.grid_projection(memory)
        mean = grid.mean(dim=1)
        return {"grid": grid, "keys": self.att_grid(grid), "h": torch.tanh(self.init_h(mean)),
                "c": torch.tanh(self.init_c(mean))}

    def _advance(self, state: dict, token: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        scores = self.att_score(torch.tanh(state["keys"] + self.att_hidden(state["h"])[:, None])).squeeze(-1)
        alpha = scores.softmax(dim=-1)
        context = (alpha[..., None] * state["grid"]).sum(dim=1) * torch.sigmoid(self.gate(state["h"]))
        h, c = self.cell(torch.cat([self.embed(token), context], dim=-1), (state["h"], state["c"]))
        return self.out(self.dropout(h)), {**state, "h": h, "c": c}, alpha

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.start(memory)
        logits, weights = [], []
        for t in range(tokens.shape[1]):
            step_logits, state, alpha = self._advance(state, tokens[:, t])
            logits.append(step_logits)
            weights.append(alpha)
        return torch.stack(logits, dim=1), torch.stack(weights, dim=1)

    def step(self, state: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        logits, state, alpha = self._advance(state, tokens[:, -1])
        return logits.log_softmax(-1), state, alpha

    @staticmethod
    def reorder(state: dict, index: torch.Tensor) -> dict:
        return {name: value[index] for name, value in state.items()}


DECODERS = {"transformer": TransformerCaptioner, "lstm": LSTMCaptioner}


def build_decoder(kind: str, **options: object) -> nn.Module:
    return DECODERS[kind](**options)
