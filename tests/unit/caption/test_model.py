"""Decoders, beam search, vocabulary, metrics and the encoder's shapes, on constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from visiontune.caption.decoders import LSTMCaptioner, TransformerCaptioner
from visiontune.caption.encoder import encoder_spec, to_memory
from visiontune.caption.metrics import caption_scores, share_with_ci
from visiontune.caption.search import beam_search
from visiontune.caption.vocab import Vocabulary
from visiontune.errors import UserError

PAD, BOS, EOS, A, B = range(5)


class TableDecoder(torch.nn.Module):
    """Next-word probabilities that depend only on the last word: greedy takes A (0.6) and then
    ends at 0.4; the best caption is B EOS (0.4 * 0.9)."""

    TABLE = {BOS: {A: 0.6, B: 0.4}, A: {A: 0.3, B: 0.3, EOS: 0.4}, B: {EOS: 0.9, A: 0.1}}

    def start(self, memory):
        return {"memory": memory}

    def step(self, state, tokens):
        out = torch.full((tokens.shape[0], 5), -math.inf)
        for row, last in enumerate(tokens[:, -1].tolist()):
            for word, p in self.TABLE.get(last, {EOS: 1.0}).items():
                out[row, word] = math.log(p)
        return out, state, torch.ones(tokens.shape[0], 1)

    @staticmethod
    def reorder(state, index):
        return {"memory": state["memory"][index]}


def test_beam_search_finds_the_caption_greedy_misses() -> None:
    memory = torch.zeros(2, 1, 1)
    greedy = beam_search(TableDecoder(), memory, BOS, EOS, max_length=6, beam=1)
    beam = beam_search(TableDecoder(), memory, BOS, EOS, max_length=6, beam=3)
    assert greedy.tokens == [[A], [A]]
    assert beam.tokens == [[B], [B]]
    assert beam.scores[0] == pytest.approx(math.log(0.36) / ((5 + 2) / 6) ** 0.7)
    assert beam.attention[0].shape == (1, 1)


def test_banned_words_are_never_generated_and_length_is_capped() -> None:
    out = beam_search(TableDecoder(), torch.zeros(1, 1, 1), BOS, EOS, max_length=4, beam=2, banned=(B, EOS))
    assert out.tokens == [[A, A, A]]


@pytest.mark.parametrize("cls", [TransformerCaptioner, LSTMCaptioner])
def test_decoders_are_causal_and_attend_over_the_grid(cls) -> None:
    torch.manual_seed(0)
    decoder = cls(vocab_size=9, channels=6, grid=(2, 3), width=16, layers=1, heads=2, max_length=8).eval()
    memory = torch.randn(1, 6, 6).repeat(2, 1, 1)
    tokens = torch.tensor([[BOS, 5, 6, 7], [BOS, 5, 6, 8]])
    logits, attention = decoder(memory, tokens)
    assert logits.shape == (2, 4, 9) and attention.shape == (2, 4, 6)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(logits[0, :3], logits[1, :3])  # the last word differs: earlier steps cannot see it
    assert not torch.allclose(logits[0, 3], logits[1, 3])


@pytest.mark.parametrize("cls", [TransformerCaptioner, LSTMCaptioner])
def test_a_decoder_learns_to_caption_what_it_sees(cls) -> None:
    """Two kinds of memory, two captions: after a few hundred steps, beam search says each one."""
    torch.manual_seed(0)
    vocab = Vocabulary.train(["a red circle", "a blue square on the left"])
    texts = ["a red circle", "a blue square on the left"]
    memory = torch.stack([torch.eye(4)[:2], torch.eye(4)[2:]])  # [2 images, 2 cells, 4 channels]
    tokens = vocab.encode(texts, 10)
    decoder = cls(vocab_size=len(vocab), channels=4, grid=(1, 2), width=32, layers=1, heads=2, max_length=10,
                  dropout=0.0, pad_id=vocab.pad)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(150):
        logits, _ = decoder(memory, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), tokens[:, 1:].reshape(-1),
                                                 ignore_index=vocab.pad)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = beam_search(decoder.eval(), memory, vocab.bos, vocab.eos, 10, beam=2, banned=(vocab.pad, vocab.bos))
    assert [vocab.decode(t) for t in out.tokens] == texts


def test_vocabulary_round_trip_unknown_words_and_saving(tmp_path) -> None:
    vocab = Vocabulary.train(["A small red circle, left of a square."])
    ids = vocab.encode(["a small zebra circle"], 8)[0].tolist()
    assert ids[0] == vocab.bos and vocab.unk in ids and ids[5] == vocab.eos and ids[6:] == [vocab.pad] * 2
    assert vocab.decode(ids[1:]) == "a small circle"  # UNK is dropped from what is shown
    assert vocab.tokenize("A Zebra, LEFT.") == "a zebra , left ."
    vocab.save(tmp_path / "t.json")
    assert Vocabulary.load(tmp_path / "t.json").encode(["a small"], 4).tolist() == vocab.encode(["a small"], 4).tolist()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not a readable tokenizer"):
        Vocabulary.load(tmp_path / "bad.json")


def test_metrics_rank_right_captions_above_wrong_ones() -> None:
    refs = [["a small red circle left of a blue square", "a blue square right of a small red circle"],
            ["a large green triangle on the left", "there is a large green triangle on the left"],
            ["a yellow circle above a red square", "a red square below a yellow circle"]]
    right = ["a small red circle left of a blue square", "a large green triangle on the left",
             "a yellow circle above a red square"]
    wrong = ["a small red circle right of a blue square", "a large green triangle on the right",
             "a yellow circle below a red square"]
    good, per_image = caption_scores(refs, right)
    bad, _ = caption_scores(refs, wrong)
    assert good["bleu4"]["value"] == pytest.approx(1.0) and good["rouge_l"]["value"] == pytest.approx(1.0)
    for name in ("bleu4", "cider", "rouge_l"):
        assert bad[name]["value"] < good[name]["value"]
        low, high = bad[name]["ci95"]
        assert low <= bad[name]["value"] <= high
    assert per_image["cider"].shape == (3,)
    assert share_with_ci([1, 1, 0, 1])["value"] == 0.75


def test_encoder_sizes_come_from_the_backbone() -> None:
    grid = encoder_spec("test_resnet", "grid", None, 64)
    assert (grid.layers, grid.channels, grid.grid) == (("layer4",), 96, (2, 2))
    multi = encoder_spec("test_resnet", "multi", None, 64)
    assert (multi.layers, multi.channels, multi.grid) == (("layer3", "layer4"), 192 + 96, (2, 2))
    assert encoder_spec("test_resnet", "pooled", None, 64).grid == (1, 1)
    maps = [torch.randn(3, 192, 4, 4), torch.randn(3, 96, 2, 2)]
    assert to_memory(maps, multi).shape == (3, 4, 288)
    with pytest.raises(UserError, match="unknown layer"):
        encoder_spec("test_resnet", "grid", ["layer9"], 64)
    with pytest.raises(UserError, match="--features"):
        encoder_spec("test_resnet", "boxes", None, 64)
    with pytest.raises(UserError, match="one layer"):
        encoder_spec("test_resnet", "grid", ["layer3", "layer4"], 64)
