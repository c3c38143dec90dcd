"""JPEG draft decoding keeps orientation and what the resize sees; the batched JPEG decoder
(GPU path, run here with device="cpu") keeps order, falls back per file and skips bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visiontune.data.dataset import ImageFiles
from visiontune.data.jpeg_batches import JpegBytes, decode_items, iter_jpeg_batches
from visiontune.data.transforms import Preprocessing

LIMIT = 10**8
PRE = Preprocessing(input_size=56, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875)


def smooth(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth colour field with a bright top-left corner (so a rotation shows)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(40, 200, (4, 4, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC)).copy()
    image[: size[1] // 5, : size[0] // 5] = 255
    return Image.fromarray(image)


def rotated_jpeg(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (90 degrees clockwise)
    smooth((480, 320)).save(path, quality=95, exif=exif)
    return path


def uint8_item(path: Path, draft: bool) -> torch.Tensor:
    files = ImageFiles([str(path)], PRE.eval_transform(normalize=False), LIMIT,
                       draft_size=PRE.resize_size if draft else None)
    return files[0][0]


def test_draft_keeps_the_exif_rotation_and_the_resized_content(tmp_path):
    path = rotated_jpeg(tmp_path / "rotated.jpg")
    exact, draft = uint8_item(path, False), uint8_item(path, True)
    assert exact.shape == draft.shape == (3, 56, 56)
    assert np.abs(exact.float() - draft.float()).mean() < 3  # grey levels of 255
    from visiontune.data.images import load_rgb

    assert load_rgb(path, LIMIT).size == (320, 480) and load_rgb(path, LIMIT, PRE.resize_size).size == (80, 120)
    assert np.asarray(load_rgb(path, LIMIT, PRE.resize_size))[2, -3].min() == 255  # the corner went top-right


def test_draft_decodes_cmyk_jpegs_and_leaves_pngs_untouched(tmp_path):
    smooth((400, 300)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    exact, draft = uint8_item(tmp_path / "cmyk.jpg", False), uint8_item(tmp_path / "cmyk.jpg", True)
    assert exact.shape == draft.shape and np.abs(exact.float() - draft.float()).mean() < 3
    smooth((400, 300)).save(tmp_path / "plain.png")
    assert torch.equal(uint8_item(tmp_path / "plain.png", False), uint8_item(tmp_path / "plain.png", True))


def test_batched_jpeg_decoding_matches_per_file_and_falls_back_per_file(tmp_path):
    rotated_jpeg(tmp_path / "a.jpg")
    smooth((300, 200), 1).save(tmp_path / "b.png")
    smooth((300, 200), 2).convert("CMYK").save(tmp_path / "c.jpg")
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "d.jpg").write_bytes(whole[: len(whole) * 6 // 10])  # truncated: the header still opens
    smooth((260, 260), 3).save(tmp_path / "e.jpg", quality=90)
    paths = [str(tmp_path / n) for n in ("a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg")]
    transform = PRE.eval_transform(normalize=False)
    dataset = JpegBytes(paths, transform, LIMIT)
    assert [dataset[i][0] for i in range(5)] == ["jpeg", "image", "image", "jpeg", "jpeg"]
    batches = list(iter_jpeg_batches(paths, transform, LIMIT, batch_size=5, workers=0, device="cpu"))
    (images, kept, skipped), = batches
    assert kept == [0, 1, 2, 4] and [i for i, _ in skipped] == [3] and "truncated" in skipped[0][1]
    for row, index in enumerate(kept):  # libjpeg through torchvision vs Pillow: the same pixels, near enough
        reference = uint8_item(Path(paths[index]), False)
        assert images[row].shape == reference.shape
        assert np.abs(images[row].float() - reference.float()).mean() < 2


def test_a_batch_the_device_decoder_rejects_is_decoded_file_by_file(tmp_path, monkeypatch):
    smooth((200, 200)).save(tmp_path / "a.jpg")
    dataset = JpegBytes([str(tmp_path / "a.jpg")] * 2, PRE.eval_transform(normalize=False), LIMIT)
    calls = []

    def flaky(data, **options):
        calls.append(type(data).__name__)
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: batch failed")
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr("visiontune.data.jpeg_batches.decode_jpeg", flaky)
    images, kept, skipped = decode_items([dataset[0], dataset[1]], dataset, torch.device("cpu"))
    assert calls == ["list", "Tensor", "Tensor"] and kept == [0, 1] and not skipped
    assert torch.equal(images[0], uint8_item(tmp_path / "a.jpg", False))  # the CPU path's pixels


def test_the_draft_scale_always_covers_the_resize_target(tmp_path):
    from visiontune.data.images import load_rgb

    for size in [(1000, 300), (300, 1000), (64, 2000), (2000, 2000)]:
        smooth(size).save(tmp_path / "x.jpg")
        drafted = load_rgb(tmp_path / "x.jpg", LIMIT, PRE.resize_size)
        assert min(drafted.size) >= min(PRE.resize_size, *size)
