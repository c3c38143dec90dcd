"""The decoded-image cache: hits, invalidation, the size bound, atomic and concurrent writes."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import visiontune.data.cache as cache_module
from tests.conftest import (
    BOMB_MAX_PIXELS,
    COLOURS,
    colour_image,
    write_class_folders,
    write_odd_and_bad_files,
)
from visiontune.data.cache import DecodedImageCache
from visiontune.data.dataset import ImageDataset, ImageFiles
from visiontune.data.images import ImageLoadError, load_rgb
from visiontune.data.samples import Sample
from visiontune.data.transforms import Preprocessing

MAX_PIXELS = 10_000
PRE = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 0.875)  # resize_size 37


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    root = write_class_folders(tmp_path / "data", {"red": 4, "blue": 4})
    return sorted(root.rglob("*.png"))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths decoded by the cache, in order."""
    seen: list[str] = []

    def counting_load(path, max_pixels):
        seen.append(str(path))
        return load_rgb(path, max_pixels)

    monkeypatch.setattr(cache_module, "load_rgb", counting_load)
    return seen


def make_cache(tmp_path: Path, max_bytes: int = 10**8) -> DecodedImageCache:
    return DecodedImageCache.for_preprocessing(PRE, root=tmp_path / "cache", max_bytes=max_bytes)


def npy_files(cache: DecodedImageCache) -> list[Path]:
    return sorted(cache.root.rglob("*.npy"))


@pytest.mark.parametrize("interpolation, crop_mode", [("bilinear", "center"), ("bicubic", "center"), ("bicubic", "squash")])
def test_cached_uint8_eval_plus_normalizer_equals_the_float_eval_transform(
    tmp_path: Path, interpolation: str, crop_mode: str
) -> None:
    pre = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation, 0.875, crop_mode)
    cache = DecodedImageCache.for_preprocessing(pre, root=tmp_path / "cache")
    normalize = pre.normalizer()
    for i, size in enumerate([(40, 48), (120, 70), (20, 25)]):  # down- and up-scaled
        path = tmp_path / f"img{i}.jpg"
        colour_image(COLOURS["green"], seed=i, size=size).save(path)
        expected = pre.eval_transform()(load_rgb(path, MAX_PIXELS)).as_subclass(torch.Tensor)
        for _ in range(2):  # miss, then hit
            got = normalize(pre.eval_transform(normalize=False)(cache.load(path, MAX_PIXELS))[None])[0]
            # Same torchvision resize on both paths: only float rounding of the fused multiply-add.
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_second_load_is_a_hit_also_from_a_new_or_unpickled_cache(tmp_path: Path, images: list[Path], decodes: list[str]) -> None:
    cache = make_cache(tmp_path)
    first = [cache.load(p, MAX_PIXELS) for p in images]
    assert len(decodes) == len(images) and len(npy_files(cache)) == len(images)
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 and min(t.shape[1:]) == PRE.resize_size for t in first)
    for other in (cache, make_cache(tmp_path), pickle.loads(pickle.dumps(cache))):
        again = [other.load(p, MAX_PIXELS) for p in images]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(decodes) == len(images)


def test_changed_file_is_decoded_again_even_with_its_old_mtime(tmp_path: Path, images: list[Path], decodes: list[str]) -> None:
    cache = make_cache(tmp_path)
    path = images[0]
    before = cache.load(path, MAX_PIXELS)
    st = path.stat()
    colour_image(COLOURS["blue"], seed=5).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `rsync -a` would
    after = cache.load(path, MAX_PIXELS)
    assert len(decodes) == 2 and not torch.equal(before, after)
    assert torch.equal(after, cache.load(path, MAX_PIXELS))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache.load(path, MAX_PIXELS)
    assert len(decodes) == 3


def test_settings_are_part_of_the_key(tmp_path: Path, images: list[Path], decodes: list[str]) -> None:
    cache = make_cache(tmp_path)
    cache.load(images[0], MAX_PIXELS)
    cache.load(images[0], MAX_PIXELS + 1)
    bigger = DecodedImageCache(48, "bilinear", root=cache.root)
    assert min(bigger.load(images[0], MAX_PIXELS).shape[1:]) == 48
    assert len(decodes) == 3


def test_eviction_keeps_the_total_under_max_bytes_and_keeps_recent_entries(tmp_path: Path, images: list[Path]) -> None:
    entry_bytes = make_cache(tmp_path / "probe").load(images[0], MAX_PIXELS).numel() + 128
    cache = make_cache(tmp_path, max_bytes=3 * entry_bytes + 10)
    for i, path in enumerate(images[:3]):
        cache.load(path, MAX_PIXELS)
        os.utime(cache.entry_path(path, MAX_PIXELS), (1000 + i, 1000 + i))  # an explicit age order
    cache.load(images[0], MAX_PIXELS)  # the oldest entry, used again
    cache.load(images[3], MAX_PIXELS)  # a fourth entry: over the bound, down to 90% of it
    assert [cache.entry_path(p, MAX_PIXELS).exists() for p in images[:4]] == [True, False, False, True]
    for path in images[4:]:
        cache.load(path, MAX_PIXELS)
        assert 0 < cache.size_on_disk() <= cache.max_bytes
    assert cache.entry_path(images[-1], MAX_PIXELS).exists()


def test_evict_tolerates_entries_vanishing_meanwhile(tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(tmp_path)
    for path in images:
        cache.load(path, MAX_PIXELS)
    listed = cache._entries()
    for _, _, path in listed[::2]:
        path.unlink()  # another process evicted these after our scan
    monkeypatch.setattr(cache, "_entries", lambda: listed)
    assert cache.evict(0) == 0
    assert npy_files(cache) == []


def test_corrupt_or_truncated_entry_is_rebuilt(tmp_path: Path, images: list[Path], decodes: list[str]) -> None:
    cache = make_cache(tmp_path)
    path = images[0]
    good = cache.load(path, MAX_PIXELS)
    entry = cache.entry_path(path, MAX_PIXELS)
    for damage in (entry.read_bytes()[:100], b"not an npy file", b""):
        entry.write_bytes(damage)
        assert torch.equal(cache.load(path, MAX_PIXELS), good)
        assert np.array_equal(np.load(entry).transpose(2, 0, 1), good.numpy())
    assert len(decodes) == 4


def test_failed_write_leaves_no_partial_file_and_still_returns_the_image(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module.np, "save", disk_full)
    cache = make_cache(tmp_path)
    image = cache.load(images[0], MAX_PIXELS)
    assert image.dtype == torch.uint8 and min(image.shape[1:]) == PRE.resize_size
    assert [p for p in cache.root.rglob("*") if p.is_file()] == []


def test_stale_temporary_file_is_ignored_and_later_removed(tmp_path: Path, images: list[Path]) -> None:
    cache = make_cache(tmp_path)
    entry = cache.entry_path(images[0], MAX_PIXELS)
    entry.parent.mkdir(parents=True)
    stale = entry.parent / f".{entry.stem}.crashed.tmp"
    stale.write_bytes(b"\x93NUMPY half a file")
    os.utime(stale, (1000, 1000))
    assert torch.equal(cache.load(images[0], MAX_PIXELS), cache.load(images[0], MAX_PIXELS))
    assert entry.exists() and cache.size_on_disk() == entry.stat().st_size
    assert not stale.exists()


def _load_all(args: tuple[str, list[str]]) -> list[bytes]:
    root, paths = args
    cache = DecodedImageCache.for_preprocessing(PRE, root=root, max_bytes=10**8)
    return [cache.load(p, MAX_PIXELS).permute(1, 2, 0).numpy().tobytes() for p in paths]


def test_concurrent_writers_of_the_same_keys_leave_valid_entries(tmp_path: Path, images: list[Path]) -> None:
    root, paths = str(tmp_path / "cache"), [str(p) for p in images]
    expected = _load_all((str(tmp_path / "reference"), paths))
    with ThreadPoolExecutor(4) as threads:
        results = list(threads.map(_load_all, [(root, paths)] * 4))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as processes:
        results += list(processes.map(_load_all, [(root + "2", paths)] * 2))
    assert all(result == expected for result in results)
    for folder in (root, root + "2"):
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        assert len(files) == len(paths) and all(p.suffix == ".npy" for p in files)
        assert sorted(np.load(p).tobytes() for p in files) == sorted(expected)


def test_dataset_with_cache_skips_bad_files_and_caches_only_good_ones(tmp_path: Path) -> None:
    readable, unusable = write_odd_and_bad_files(tmp_path / "odd")
    names = sorted(readable | unusable)
    samples = [Sample(path=str(tmp_path / "odd" / name), label="x", split="train") for name in names]
    cache = make_cache(tmp_path)
    dataset = ImageDataset(samples, {"x": 0}, PRE.eval_transform(normalize=False), BOMB_MAX_PIXELS, cache=cache)
    for _ in range(2):
        items = {name: dataset[i] for i, name in enumerate(names)}
        assert {n for n, item in items.items() if item is None} == unusable
        assert all(items[n][0].dtype == torch.uint8 and items[n][0].shape == (3, 32, 32) for n in readable)
    assert len(npy_files(cache)) == len(readable)
    files = ImageFiles([s.path for s in samples], PRE.eval_transform(), BOMB_MAX_PIXELS, cache=cache)
    assert {names[i] for i in range(len(names)) if files[i][0] is None} == unusable
    with pytest.raises(ImageLoadError):
        cache.load(tmp_path / "missing.jpg", MAX_PIXELS)


def test_unwritable_cache_folder_still_serves_images(tmp_path: Path, images: list[Path]) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    cache = DecodedImageCache.for_preprocessing(PRE, root=blocker / "cache")
    assert torch.equal(cache.load(images[0], MAX_PIXELS), cache.load(images[0], MAX_PIXELS))


def test_default_root_and_size_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISIONTUNE_CACHE", str(tmp_path / "here"))
    monkeypatch.setenv("VISIONTUNE_CACHE_GB", "0.5")
    cache = DecodedImageCache(37)
    assert cache.root == tmp_path / "here" and cache.max_bytes == 500_000_000
