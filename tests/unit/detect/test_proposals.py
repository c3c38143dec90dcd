"""Proposals: sliding windows' shape and bounds, selective search where the contrib cv2 is
installed (skipped where it is not), and the per-image cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.detect import proposals as proposals_module
from visiontune.detect.proposals import (
    ProposalCache,
    propose,
    selective_search_available,
)
from visiontune.errors import UserError

needs_selective_search = pytest.mark.skipif(
    not selective_search_available(), reason="cv2 is not the contrib build (opencv-python-headless installed over it)")


def tile(width: int = 96, height: int = 64) -> np.ndarray:
    image = np.full((height, width, 3), 200, np.uint8)
    image[10:30, 20:60] = (30, 30, 30)
    return image


def test_sliding_windows_lie_in_the_image_without_repeats_or_tiny_boxes():
    boxes = propose(tile(), "sliding", max_proposals=2000)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(boxes) > 20
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 8).all() and ((boxes[:, 3] - boxes[:, 1]) >= 8).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert [0, 0, 64, 64] in boxes.tolist() or [16, 0, 80, 64] in boxes.tolist()  # the largest square, centred


def test_sliding_windows_are_capped_across_every_scale():
    everything = propose(tile(), "sliding", max_proposals=10_000)
    capped = propose(tile(), "sliding", max_proposals=20)
    assert len(capped) == 20
    sides = lambda b: set(np.round(b[:, 2] - b[:, 0]).tolist())
    assert min(sides(capped)) == min(sides(everything)) and max(sides(capped)) == max(sides(everything))


def test_a_wrong_mode_or_maximum_is_one_message():
    with pytest.raises(UserError, match="proposals must be one of fast, quality, sliding"):
        propose(tile(), "edges")
    with pytest.raises(UserError, match="at least 1"):
        propose(tile(), "sliding", max_proposals=0)
    with pytest.raises(UserError, match="selective-search side must be at least 32 pixels"):
        propose(tile(), "fast", search_side=16)


def test_selective_search_without_the_contrib_build_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(proposals_module, "selective_search_available", lambda: False)
    with pytest.raises(UserError, match="pip uninstall -y opencv-python-headless opencv-contrib-python-headless "
                                        "&& pip install opencv-contrib-python-headless"):
        propose(tile(), "fast")


@needs_selective_search
def test_selective_search_boxes_are_in_the_original_scale():
    image = np.full((128, 256, 3), 220, np.uint8)
    image[40:90, 100:180] = (20, 20, 120)
    boxes = propose(image, "fast", max_proposals=50, search_side=64)  # searched at 64 x 32
    assert 0 < len(boxes) <= 50 and (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 128).all()
    assert boxes[:, 2].max() > 128  # scaled back: boxes reach beyond the searched width


def test_the_cache_returns_the_same_boxes_and_writes_nothing_new(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(tile()).save(path)
    cache = ProposalCache(tmp_path / "cache", "sliding", 50)
    first = cache.proposals(path, tile())
    files = sorted((tmp_path / "cache").rglob("*"))
    again = ProposalCache(tmp_path / "cache", "sliding", 50)
    second = again.proposals(path, np.zeros((8, 8, 3), np.uint8))  # a hit never looks at the pixels
    assert np.array_equal(first, second) and (cache.misses, again.hits, again.misses) == (1, 1, 0)
    assert sorted((tmp_path / "cache").rglob("*")) == files
    assert len([f for f in files if f.suffix == ".npy"]) == 1
    other = ProposalCache(tmp_path / "cache", "sliding", 20).proposals(path, tile())
    assert len(other) == 20  # another maximum is another entry


def test_the_search_side_keys_selective_search_entries_but_not_windows(tmp_path, monkeypatch):
    path = tmp_path / "tile.png"
    Image.fromarray(tile()).save(path)
    searched = []
    monkeypatch.setattr(proposals_module, "_selective_search",
                        lambda image, mode, side: searched.append(side) or np.array([[0, 0, side / 4, side / 4]]))
    monkeypatch.setattr(proposals_module, "selective_search_available", lambda: True)
    small = ProposalCache(tmp_path / "cache", "fast", 50, search_side=64).proposals(path, tile())
    large = ProposalCache(tmp_path / "cache", "fast", 50, search_side=256).proposals(path, tile())
    assert searched == [64, 256] and small.tolist() == [[0, 0, 16, 16]] and large.tolist() == [[0, 0, 64, 64]]
    windows = [ProposalCache(tmp_path / "cache", "sliding", 50, search_side=side) for side in (64, 256)]
    assert windows[0].path_for(path) == windows[1].path_for(path)


def test_a_damaged_cache_file_is_recomputed(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(tile()).save(path)
    cache = ProposalCache(tmp_path / "cache", "sliding", 50)
    boxes = cache.proposals(path, tile())
    cache.path_for(path).write_bytes(b"not a npy file")
    assert np.array_equal(ProposalCache(tmp_path / "cache", "sliding", 50).proposals(path, tile()), boxes)
