"""The caption vocabulary: a Hugging Face `tokenizers` word-level tokenizer trained on the training
captions only (no network), saved in the run as `tokenizer.json`.

Captions are NFKC-normalised, lower-cased and split on whitespace and punctuation. A word the
training captions never had becomes [UNK] when encoding; generated captions never contain it
(it is masked out of the search).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from visiontune.errors import UserError
from visiontune.io import write_text_atomic

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIALS = [PAD, BOS, EOS, UNK]


class Vocabulary:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad, self.bos, self.eos, self.unk = (tokenizer.token_to_id(t) for t in SPECIALS)

    @classmethod
    def train(cls, captions: Iterable[str], min_frequency: int = 1) -> Vocabulary:
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=SPECIALS,
                                                                          min_frequency=min_frequency))
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            raise UserError(f"{path} is not a readable tokenizer file: {exc}") from None

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.tokenizer.to_str())

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def tokenize(self, caption: str) -> str:
        """The caption's words as the vocabulary sees them, unknown words kept: what metrics compare."""
        normalized = self.tokenizer.normalizer.normalize_str(caption)
        return " ".join(word for word, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(normalized))

    def encode(self, captions: list[str], max_length: int) -> torch.Tensor:
        """[N, max_length] ids: BOS, the words (cut to fit), EOS, then PAD."""
        out = torch.full((len(captions), max_length), self.pad, dtype=torch.long)
        for row, encoding in enumerate(self.tokenizer.encode_batch(captions)):
            ids = [self.bos, *encoding.ids[:max_length - 2], self.eos]
            out[row, :len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """Words up to the first EOS, specials dropped."""
        words = []
        for i in ids:
            if i == self.eos:
                break
            if i not in (self.pad, self.bos, self.unk):
                words.append(self.tokenizer.id_to_token(i))
        return " ".join(words)
