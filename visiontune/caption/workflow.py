"""`visiontune caption train`: a caption decoder trained on cached features of a frozen encoder.

The encoder runs once over every image (un-augmented, evaluation preprocessing; squash, so no
shape at an edge is cropped away) and its memory grids stay in RAM as float16. Each epoch then
trains only the decoder with teacher forcing and label-smoothed cross-entropy (AdamW, linear
warm-up then cosine), decodes the validation images greedily and keeps the epoch with the best
validation CIDEr-D (or BLEU-4); training stops after `patience` epochs without a better one. The
test split is only scored once, by the kept model, at the end.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import safetensors.torch
import torch
import yaml
from torch import nn

from visiontune._version import __version__
from visiontune.caption.config import CaptionConfig, build_caption_config
from visiontune.caption.data import CaptionSet, read_captions
from visiontune.caption.decoders import build_decoder
from visiontune.caption.encoder import EncoderSpec, encode_files, encoder_layers, encoder_spec
from visiontune.caption.metrics import caption_scores
from visiontune.caption.run import CaptionRun, generate
from visiontune.caption.vocab import Vocabulary
from visiontune.data.dataset import default_workers
from visiontune.data.transforms import Preprocessing
from visiontune.devices import resolve_device
from visiontune.errors import UserError
from visiontune.io import write_csv_atomic, write_text_atomic
from visiontune.locking import is_only_lock, locked_dir
from visiontune.models.extractor import create_extractor
from visiontune.runformat import (
    CAPTIONS_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ENCODER_FILE,
    META_FILE,
    METRICS_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    TOKENIZER_FILE,
    meta_fields,
)
from visiontune.training.checkpoint import load_state, save_model, save_state
from visiontune.training.schedules import lr_factor
from visiontune.training.setup import make_fabric

log = logging.getLogger(__name__)
WARMUP = 0.05
METRIC_FIELDS = ["epoch", "lr", "train_loss", "val_cider", "val_bleu4", "seconds"]


def fit(data: str | Path | None = None, *, resume: str | Path | None = None, **options: object) -> CaptionRun:
    """Train a captioner on `data` (see CaptionConfig for the options), or continue `resume`."""
    if resume is not None:
        run_dir = Path(resume).expanduser()
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"{run_dir} is not a caption run to resume (no {CONFIG_FILE})")
        try:
            saved_options = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(f"{run_dir / CONFIG_FILE} is damaged: {exc}") from None
        if not isinstance(saved_options, dict) or not (run_dir / ENCODER_FILE).is_file():
            raise UserError(f"{run_dir} was stopped before its files were written; train again with another --out")
        cfg = build_caption_config(**saved_options)
    else:
        cfg = build_caption_config(data=str(data), **options)
        run_dir = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-caption-{cfg.model}").expanduser()
        if run_dir.exists() and not is_only_lock(run_dir):
            raise UserError(f"{run_dir} already exists and is not empty; use --resume {run_dir} or another --out")
        cfg.out = str(run_dir)
    with locked_dir(run_dir):
        _train(cfg, run_dir, resuming=resume is not None)
    return CaptionRun(run_dir)


def _train(cfg: CaptionConfig, run_dir: Path, resuming: bool) -> None:
    started = time.perf_counter()
    # a resumed run reads its own captions.csv: the split it started with, whatever became of the source
    source = run_dir / CAPTIONS_FILE if resuming else cfg.data
    captions = read_captions(source, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    extractor = create_extractor(cfg.model, encoder_layers(cfg.model, cfg.features, cfg.layers), cfg.pretrained,
                                 cfg.weights, cfg.seed)
    preprocessing = Preprocessing.from_model(extractor.model, cfg.image_size, crop_mode="squash")
    spec = encoder_spec(cfg.model, cfg.features, cfg.layers, preprocessing.input_size)
    if resuming:
        vocab = Vocabulary.load(run_dir / TOKENIZER_FILE)
        extractor.model.load_state_dict(safetensors.torch.load_file(str(run_dir / ENCODER_FILE)))
    else:
        train_captions = [c for i in captions.indices("train") for c in captions.captions[i]]
        vocab = Vocabulary.train(train_captions, cfg.min_frequency)
    device = resolve_device(cfg.device)
    memory, captions = _encode(extractor, spec, preprocessing, captions, cfg, device)
    fabric = make_fabric(cfg.device)
    decoder = build_decoder(cfg.decoder, vocab_size=len(vocab), channels=spec.channels, grid=spec.grid,
                            width=_width(cfg), layers=cfg.decoder_layers, heads=cfg.heads, max_length=cfg.max_length,
                            dropout=cfg.dropout, pad_id=vocab.pad)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    decoder, optimizer = fabric.setup(decoder, optimizer)
    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0}
    if resuming and (run_dir / STATE_FILE).is_file():  # none yet: stopped during the first epoch, so it starts over
        saved = load_state(run_dir / STATE_FILE)
        decoder.load_state_dict(saved["decoder"])
        optimizer.load_state_dict(saved["optimizer"])
        state = {key: saved[key] for key in state}
        torch.set_rng_state(saved["rng"])  # dropout continues exactly as an uninterrupted run's
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    elif not resuming:
        _write_run_files(cfg, run_dir, captions, vocab, spec, preprocessing, extractor)
    train_idx = captions.indices("train")
    pairs_image = torch.tensor([i for i in train_idx for _ in captions.captions[i]])
    pairs_tokens = vocab.encode([c for i in train_idx for c in captions.captions[i]], cfg.max_length)
    steps_per_epoch = -(-len(pairs_image) // cfg.batch_size)
    val_idx = captions.indices("val")
    val_refs = [[vocab.tokenize(c) for c in captions.captions[i]] for i in val_idx]
    loss_fn = nn.CrossEntropyLoss(ignore_index=vocab.pad, label_smoothing=cfg.label_smoothing)
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["bad_epochs"] >= cfg.patience:
            break
        epoch_start = time.perf_counter()
        decoder.train()
        order = torch.randperm(len(pairs_image), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        total_loss, lr = torch.zeros((), device=fabric.device), cfg.lr
        for step in range(steps_per_epoch):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            lr = cfg.lr * lr_factor("cosine", (epoch - 1) * steps_per_epoch + step, cfg.epochs * steps_per_epoch,
                                    warmup_fraction=WARMUP)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens = pairs_tokens[batch].to(fabric.device)
            logits, _ = decoder(memory[pairs_image[batch]].to(fabric.device).float(), tokens[:, :-1])
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            total_loss += loss.detach()  # summed on the device: one host sync per epoch, not per step
        val = _validate(decoder, vocab, memory[val_idx], val_refs, cfg, fabric.device)
        score = val[cfg.monitor]["value"]
        improved = score > state["best"]
        state |= {"epoch": epoch, "bad_epochs": 0 if improved else state["bad_epochs"] + 1}
        if improved:
            state |= {"best": score, "best_epoch": epoch}
            save_model(run_dir / CHECKPOINT_DIR / "best.safetensors", decoder, {"epoch": str(epoch)})
        save_model(run_dir / CHECKPOINT_DIR / "last.safetensors", decoder, {"epoch": str(epoch)})
        save_state(run_dir / STATE_FILE, {"decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                                          "rng": torch.get_rng_state(), **state})
        row = {"epoch": epoch, "lr": lr, "train_loss": float(total_loss) / steps_per_epoch,
               "val_cider": val["cider"]["value"], "val_bleu4": val["bleu4"]["value"],
               "seconds": time.perf_counter() - epoch_start}
        _append_metrics(run_dir / METRICS_FILE, row)
        log.info("epoch %d/%d  loss %.3f  val CIDEr-D %.3f  BLEU-4 %.3f%s  (%.1f s)", epoch, cfg.epochs,
                 row["train_loss"], row["val_cider"], row["val_bleu4"], "  *" if improved else "", row["seconds"])
    _finish(cfg, run_dir, captions, state, time.perf_counter() - started)


def _width(cfg: CaptionConfig) -> int:
    if cfg.decoder == "transformer" and cfg.width % cfg.heads:
        raise UserError(f"--width {cfg.width} must be a multiple of --heads {cfg.heads}")
    return cfg.width


def _encode(extractor, spec: EncoderSpec, preprocessing: Preprocessing, captions: CaptionSet, cfg: CaptionConfig,
            device: torch.device) -> tuple[torch.Tensor, CaptionSet]:
    """Memory of every readable image; unreadable ones are dropped from the set and listed."""
    started = time.perf_counter()
    workers = default_workers() if cfg.workers is None else cfg.workers
    memory, kept, skipped = encode_files(extractor, spec, preprocessing, captions.images, workers=workers,
                                         device=device, max_pixels=cfg.max_pixels)
    dropped = captions.dropped + [{"image": captions.images[i], "reason": reason} for i, reason in skipped]
    for i, reason in skipped:
        log.warning("skipped %s: %s", captions.images[i], reason)
    kept_set = CaptionSet([captions.images[i] for i in kept], [captions.captions[i] for i in kept],
                          [captions.splits[i] for i in kept], dropped)
    for needed in ("train", "val"):
        if not kept_set.indices(needed):
            raise UserError(f"no readable {needed} image is left ({len(skipped)} could not be read)")
    log.info("encoded %d images with %s (%s, %d x %d x %d) in %.1f s", len(kept), cfg.model, spec.features,
             *spec.grid, spec.channels, time.perf_counter() - started)
    return memory, kept_set


def _validate(decoder, vocab: Vocabulary, memory: torch.Tensor, refs: list[list[str]], cfg: CaptionConfig,
              device: torch.device) -> dict:
    """Greedy captions of the validation memory scored against their tokenised references."""
    decoder.eval()
    generated = generate(decoder, vocab, memory, beam=1, max_length=cfg.max_length, device=device)
    scores, _ = caption_scores(refs, [vocab.decode(g) for g in generated.tokens], bootstrap=0)
    return scores


def _write_run_files(cfg: CaptionConfig, run_dir: Path, captions: CaptionSet, vocab: Vocabulary, spec: EncoderSpec,
                     preprocessing: Preprocessing, extractor) -> None:
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    vocab.save(run_dir / TOKENIZER_FILE)
    write_csv_atomic(run_dir / CAPTIONS_FILE, ["image", "caption", "split"], captions.rows())
    save_model(run_dir / ENCODER_FILE, extractor.model, {"backbone": cfg.model})
    decoder_options = {"width": _width(cfg), "layers": cfg.decoder_layers, "heads": cfg.heads,
                       "max_length": cfg.max_length, "dropout": cfg.dropout}
    meta = meta_fields("caption", __version__) | {
        "encoder": spec.to_dict(), "decoder": {"kind": cfg.decoder, **decoder_options},
        "preprocessing": preprocessing.to_dict(),
        "weights": cfg.weights or ("pretrained" if cfg.pretrained else "random"),
    }
    write_text_atomic(run_dir / META_FILE, json.dumps(meta, indent=2))
    write_text_atomic(run_dir / METRICS_FILE, ",".join(METRIC_FIELDS) + "\n")


def _append_metrics(path: Path, row: dict) -> None:
    """metrics.csv grows a line per epoch (rewritten whole, so a reader never sees half a line)."""
    rows = list(csv.DictReader(path.open(encoding="utf-8"))) if path.is_file() else []
    rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
    write_csv_atomic(path, METRIC_FIELDS, rows)


def _finish(cfg: CaptionConfig, run_dir: Path, captions: CaptionSet, state: dict, seconds: float) -> None:
    run = CaptionRun(run_dir)
    summary = {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "monitor": cfg.monitor,
               f"val_{cfg.monitor}": state["best"], "train_seconds": seconds,
               "images": {split: len(captions.indices(split)) for split in ("train", "val", "test")},
               "dropped": captions.dropped}
    if captions.indices("test"):
        summary["test"] = run.evaluate("test", beam=cfg.beam, report=cfg.report)["metrics"]
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
