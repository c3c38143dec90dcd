"""A caption run read back: its encoder, decoder and vocabulary, `predict` and `evaluate`.

`load(DIR)` works in any process: weights are safetensors, the vocabulary is `tokenizer.json`,
and the architecture is rebuilt from `model.json`, so nothing is unpickled.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from visiontune.caption.decoders import build_decoder
from visiontune.caption.encoder import EncoderSpec, encode_files
from visiontune.caption.metrics import caption_scores
from visiontune.caption.report import write_report
from visiontune.caption.search import Generated, beam_search
from visiontune.caption.vocab import Vocabulary
from visiontune.data.dataset import default_workers
from visiontune.data.paths import expand_image_paths
from visiontune.data.transforms import Preprocessing
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.models.extractor import FeatureExtractor
from visiontune.runformat import CAPTIONS_FILE, CHECKPOINT_DIR, ENCODER_FILE, TOKENIZER_FILE, read_meta

PREDICT_BATCH = 64
EVAL_DIR = "eval"


@dataclass
class Caption:
    image: str
    caption: str
    score: float  # length-normalised log-probability of the caption
    words: list[str]
    attention: torch.Tensor  # [words, rows * cols]


def generate(decoder: nn.Module, vocab: Vocabulary, memory: torch.Tensor, beam: int, max_length: int,
             device: torch.device | str = "cpu", batch_size: int = PREDICT_BATCH) -> Generated:
    """Beam search over `memory` in batches (float16 cache -> float32 on `device`)."""
    out = Generated([], [], [])
    banned = (vocab.pad, vocab.bos, vocab.unk)
    for start in range(0, len(memory), batch_size):
        chunk = memory[start:start + batch_size].to(device).float()
        part = beam_search(decoder, chunk, vocab.bos, vocab.eos, max_length, beam=beam, banned=banned)
        out.tokens += part.tokens
        out.attention += part.attention
        out.scores += part.scores
    return out


class CaptionRun:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        self.metadata = read_meta(self.dir, "caption")
        self.spec = EncoderSpec.from_dict(self.metadata["encoder"])
        self.preprocessing = Preprocessing.from_dict(self.metadata["preprocessing"])

    @functools.cached_property
    def vocab(self) -> Vocabulary:
        return Vocabulary.load(self.dir / TOKENIZER_FILE)

    def encoder(self) -> FeatureExtractor:
        extractor = FeatureExtractor(self.spec.backbone, list(self.spec.layers))
        extractor.model.load_state_dict(safetensors.torch.load_file(str(self.dir / ENCODER_FILE)))
        return extractor

    def decoder(self, which: str = "best") -> nn.Module:
        path = self.dir / CHECKPOINT_DIR / f"{which}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} is missing: the run has no finished epoch yet (resume it to train)")
        options = dict(self.metadata["decoder"])
        decoder = build_decoder(options.pop("kind"), vocab_size=len(self.vocab), channels=self.spec.channels,
                                grid=self.spec.grid, pad_id=self.vocab.pad, **options)
        decoder.load_state_dict(safetensors.torch.load_file(str(path)))
        return decoder.eval()

    def predict(self, images: Sequence[str | Path], beam: int = 3, device: str = "auto", workers: int | None = None,
                which: str = "best") -> tuple[list[Caption], list[tuple[str, str]]]:
        """Captions of the readable images and (path, reason) of the others."""
        paths = expand_image_paths([str(p) for p in images])
        device_ = resolve_device(device)
        memory, kept, skipped = encode_files(self.encoder(), self.spec, self.preprocessing, paths,
                                             workers=default_workers() if workers is None else workers, device=device_)
        decoder = self.decoder(which).to(device_)
        generated = generate(decoder, self.vocab, memory, beam, self.metadata["decoder"]["max_length"], device_)
        word = self.vocab.tokenizer.id_to_token
        captions = [Caption(paths[i], self.vocab.decode(tokens), score, [word(t) for t in tokens], attention)
                    for i, tokens, attention, score in zip(kept, generated.tokens, generated.attention,
                                                           generated.scores)]
        return captions, [(paths[i], reason) for i, reason in skipped]

    def split_captions(self, split: str) -> dict[str, list[str]]:
        """The reference captions of each image of `split`, from the run's captions.csv."""
        refs: dict[str, list[str]] = {}
        with open(self.dir / CAPTIONS_FILE, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["split"] == split:
                    refs.setdefault(row["image"], []).append(row["caption"])
        return refs

    def evaluate(self, split: str = "test", beam: int = 3, device: str = "auto", report: bool = True) -> dict:
        """Corpus BLEU-1..4, ROUGE-L, CIDEr-D with 95% CIs on `split`, per-image scores in
        RUN/eval/<split>/captions.csv, and the report (examples, best, worst, attention maps)."""
        refs = self.split_captions(split)
        if not refs:
            raise UserError(f"{self.dir} has no {split} images; choose another --split (train, val or test)")
        captions, skipped = self.predict(list(refs), beam=beam, device=device)
        if not captions:
            raise UserError(f"none of the {len(refs)} {split} images could be read")
        tokenized = [[self.vocab.tokenize(c) for c in refs[c.image]] for c in captions]
        metrics, per_image = caption_scores(tokenized, [self.vocab.tokenize(c.caption) for c in captions])
        out = self.dir / EVAL_DIR / split
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"image": c.image, "caption": c.caption, "references": " | ".join(refs[c.image]),
                 **{name: round(float(values[k]), 4) for name, values in per_image.items()}}
                for k, c in enumerate(captions)]
        write_csv_atomic(out / "captions.csv", list(rows[0]), rows)
        result = {"split": split, "beam": beam, "images": len(captions), "metrics": metrics,
                  "skipped": [{"path": p, "reason": r} for p, r in skipped],
                  "scorers": "pycocoevalcap 1.2: Bleu(4), Rouge (ROUGE-L), Cider (CIDEr-D)"}
        if split != "test":
            result["note"] = (f"the {split} images {'chose the kept epoch' if split == 'val' else 'were trained on'}: "
                              "these numbers are optimistic")
        write_text_atomic(out / "metrics.json", json.dumps(result, indent=2))
        if report:
            write_report(self.dir, self.preprocessing, self.spec, result, captions, refs, per_image,
                         out / "report.html")
        return result


def load(directory: str | Path) -> CaptionRun:
    return CaptionRun(directory)
