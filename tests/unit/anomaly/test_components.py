"""Components on plain tensors: the Gaussian (robust with threads set), the streaming coreset and
its memory bound, PatchCore's distances and the pixel metrics against slow references, thresholds,
feature layers, weights and the inference copy of the backbone."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score

from visiontune.anomaly.components.coreset import (
    greedy_coreset,
    nearest_neighbours,
    nearest_squared_distance,
)
from visiontune.anomaly.components.features import resolve_layers
from visiontune.anomaly.components.gaussian import PositionGaussians
from visiontune.anomaly.components.threshold import (
    best_f1_threshold,
    choose_threshold,
    good_quantile_threshold,
    target_recall_threshold,
)
from visiontune.anomaly.metrics import (
    RankedPixels,
    aupro,
    flagged_share_ci95,
    pixel_metrics,
)
from visiontune.anomaly.padim import Padim
from visiontune.anomaly.patchcore import PatchCore
from visiontune.errors import UserError
from visiontune.models.extractor import create_extractor


@pytest.fixture
def two_threads():
    """Batched torch.linalg.inv fails under MKL after set_num_threads(n >= 2): reproduce that setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _reference_mahalanobis(features: np.ndarray, queries: np.ndarray, regularization: float) -> np.ndarray:
    """Per position in float64: [positions, n, d] training features, [positions, q, d] queries."""
    out = []
    for train, query in zip(features, queries):
        cov = np.cov(train, rowvar=False) + regularization * np.eye(train.shape[1])
        diff = query - train.mean(0)
        out.append(np.sqrt(np.einsum("qd,de,qe->q", diff, np.linalg.inv(cov), diff)))
    return np.stack(out)


def test_streamed_gaussians_match_a_float64_reference_with_threads_set(two_threads) -> None:
    generator = torch.Generator().manual_seed(0)
    positions, n, dim = 300, 40, 24  # > one position block, so the blocked code paths run
    mixing = torch.randn(positions, dim, dim, generator=generator)
    features = torch.randn(positions, n, dim, generator=generator) @ mixing + 5.0
    queries = torch.randn(positions, 7, dim, generator=generator) @ mixing + 5.0
    batches = [features[:, i:i + 9] for i in range(0, n, 9)]  # uneven batches, merged by Chan's update
    gaussians = PositionGaussians(regularization=0.01).fit(iter(batches))
    expected = _reference_mahalanobis(features.double().numpy(), queries.double().numpy(), 0.01)
    np.testing.assert_allclose(gaussians.mahalanobis(queries).numpy(), expected, rtol=2e-3)


def test_gaussians_of_rank_deficient_features_stay_finite(two_threads) -> None:
    features = torch.randn(64, 5, 1).expand(64, 5, 30).contiguous()  # 30 identical channels, 5 samples
    gaussians = PositionGaussians().fit([features])
    assert torch.isfinite(gaussians.mahalanobis(features + 1.0)).all()


def test_coreset_keeps_the_ratio_and_covers_better_than_random() -> None:
    generator = torch.Generator().manual_seed(0)
    plane = torch.rand(4000, 2, generator=generator)  # points of a square, seen in 16 dimensions
    rows = plane @ torch.randn(2, 16, generator=generator)
    chunks = list(rows.split(700))
    selected = greedy_coreset(iter(chunks), ratio=0.02, projection_dim=8)
    assert selected.shape == (80, 16)
    greedy_radius = nearest_neighbours(rows, selected)[0].max()
    random_rows = rows[torch.randperm(4000, generator=generator)[:80]]
    assert greedy_radius < 0.8 * nearest_neighbours(rows, random_rows)[0].max()
    single_chunk = greedy_coreset([rows], ratio=0.02, projection_dim=8)
    assert greedy_radius <= 1.25 * nearest_neighbours(rows, single_chunk)[0].max()
    assert torch.equal(selected, greedy_coreset(iter(chunks), ratio=0.02, projection_dim=8))  # seeded


def _exact_greedy(rows: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy k-center in float64 on all dimensions, one pass, from row 0: the reference."""
    rows = rows.double()
    picks = [0]
    min_distance = (rows - rows[0]).pow(2).sum(1)
    while len(picks) < budget:
        picks.append(int(min_distance.argmax()))
        min_distance = torch.minimum(min_distance, (rows - rows[picks[-1]]).pow(2).sum(1))
    return torch.tensor(picks)


def test_fast_coreset_picks_one_row_of_each_separated_cluster_as_the_exact_greedy_does() -> None:
    """20 tight clusters far apart in 300 dimensions (projected to 128, float16 distances): both
    the exact greedy and the fast one, in one pass or in chunks, keep exactly one row of each."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 300, generator=generator) * 10
    labels = torch.arange(1000) % 20
    rows = centres[labels] + 0.01 * torch.randn(1000, 300, generator=generator)
    exact = set(labels[_exact_greedy(rows, 20)].tolist())
    assert exact == set(range(20))
    for chunks in ([rows], list(rows.split(250))):
        selected = greedy_coreset(chunks, ratio=0.02, seed=3)
        found = torch.cdist(selected, centres).argmin(1)
        assert sorted(found.tolist()) == list(range(20))


def test_fast_coreset_covers_within_a_tenth_of_the_exact_greedy_radius() -> None:
    """On patch-like rows (a 12-dimensional manifold in 160 dimensions), the coverage radius of the
    projected float16 greedy is within 1.1x that of the exact float64 greedy on all dimensions, in
    one pass and in chunks (measured: 1.00-1.05x), and the same for the same seed."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.tanh(torch.randn(6000, 12, generator=generator) @ torch.randn(12, 160, generator=generator))
    budget = 120
    exact_radius = nearest_neighbours(rows, rows[_exact_greedy(rows, budget)])[0].max()
    for chunks in ([rows], list(rows.split(1500))):
        selected = greedy_coreset(chunks, ratio=budget / len(rows), projection_dim=128, seed=1)
        assert len(selected) == budget
        assert nearest_neighbours(rows, selected)[0].max() <= 1.1 * exact_radius
        assert torch.equal(selected, greedy_coreset(chunks, ratio=budget / len(rows), projection_dim=128, seed=1))


def test_patchcore_fit_holds_one_chunk_whatever_the_number_of_images() -> None:
    """The memory bound behind "10,000 images in 8 GiB", scaled down: embedding batches stream
    through, none is kept once chunked, and the bank is ratio x patches for any chunk size."""
    alive: list[weakref.ref] = []
    most_alive = 0

    def stream(images: int, batch: int = 4):
        nonlocal most_alive
        generator = torch.Generator().manual_seed(1)
        for _ in range(images // batch):
            embedding = torch.randn(batch, 12, 4, 4, generator=generator)  # 16 patches per image
            alive.append(weakref.ref(embedding))
            yield embedding
            del embedding
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))

    for images, chunk_patches in ((100, 128), (400, 128), (400, 512)):
        alive.clear()
        most_alive = 0
        model = PatchCore(coreset_ratio=0.05, chunk_patches=chunk_patches).fit(stream(images))
        assert len(model.memory_bank_) == round(0.05 * images * 16)
        assert most_alive <= chunk_patches // (4 * 16) + 1  # batches waiting to form one chunk


@pytest.mark.parametrize("ties", [False, True], ids=["float64", "float32-with-ties"])
def test_aupro_equals_a_slow_reference_on_small_maps(ties: bool) -> None:
    """The threshold-by-threshold definition; float32 maps with many ties, negative scores and
    -0.0 take the sorted-integer path, float64 maps the ranked one."""
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:6, 2:8] = masks[0, 12:15, 12:19] = masks[1, 5:9, 5:9] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    if ties:
        maps = np.round(maps - 0.8, 1).astype(np.float32)
        assert (np.signbit(maps) & (maps == 0)).any()  # -0.0, a tie of 0.0
    value = aupro(maps, masks)
    from scipy import ndimage

    regions = [(i, r) for i, m in enumerate(masks) for r in _regions(ndimage.label(m, np.ones((3, 3)))[0])]
    fprs, pros = [0.0], [0.0]
    for t in np.sort(np.unique(maps))[::-1]:
        predicted = maps >= t
        fprs.append((predicted & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([predicted[i][r].mean() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= 0.3
    x, y = np.r_[fprs[inside], 0.3], np.r_[pros[inside], np.interp(0.3, fprs, pros)]
    assert value == pytest.approx(np.trapezoid(y, x) / 0.3, rel=1e-9)
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_aurocs_equal_scikit_learns_with_ties_and_images_without_masks(dtype) -> None:
    defects = ["good", "good", "good", "scratch", "scratch", "dent", "dent", "hole"]
    masks: list[np.ndarray | None] = [np.zeros((12, 12), bool) for _ in defects]
    masks[3][2:5, 2:6] = masks[3][8:10, 8:11] = masks[5][4:9, 1:3] = True  # masks[4]: empty, kept
    masks[6] = masks[7] = None  # no usable mask: left out, and "hole" has no pixel AUROC
    marked = np.stack([mask if mask is not None else np.ones((12, 12), bool) for mask in masks])
    maps = np.round(np.random.default_rng(1).random(marked.shape) + 0.5 * marked, 1).astype(dtype)
    pixels = RankedPixels(maps, masks, defects)

    def reference(images) -> float:
        kept = [i for i in images if masks[i] is not None]
        return roc_auc_score(np.stack([masks[i] for i in kept]).ravel(), maps[kept].ravel())

    metrics = pixel_metrics(pixels)
    assert metrics["pixel_auroc"] == pytest.approx(reference(range(len(defects))), rel=1e-12)
    assert metrics["defect_images_without_mask"] == 2
    for defect in ("scratch", "dent"):
        chosen = [i for i, name in enumerate(defects) if name in (defect, "good")]
        assert pixels.auroc(defect) == pytest.approx(reference(chosen), rel=1e-12)
    assert pixels.auroc("hole") is None
    unmarked = pixel_metrics(RankedPixels(maps, [np.zeros((12, 12), bool)] * len(defects), defects))
    assert unmarked["pixel_auroc"] is None and unmarked["aupro"] is None
    with pytest.raises(ValueError, match="NaN"):
        RankedPixels(np.where(marked, np.nan, maps).astype(dtype), masks, defects)


def test_patchcore_scores_equal_torch_cdists_nearest_bit_for_bit() -> None:
    """Patch distances, the farthest patch and its nearest bank patch as torch.cdist and its first
    minimum give them, also with patches equal to bank rows (distance 0, ties)."""
    generator = torch.Generator().manual_seed(0)
    model = PatchCore(num_neighbors=4)
    model.memory_bank_ = torch.randn(300, 24, generator=generator)
    embedding = torch.randn(3, 24, 8, 8, generator=generator)
    embedding[1, :, 2, 3] = embedding[1, :, 5, 5] = model.memory_bank_[7]
    patch_scores, image_scores = model.score(embedding)
    features = embedding.permute(0, 2, 3, 1).reshape(192, 24)
    distances, nearest = torch.cdist(features, model.memory_bank_).min(dim=1)  # as before, in one block
    assert torch.equal(patch_scores.flatten(), distances)
    assert torch.equal(nearest_squared_distance(features, model.memory_bank_), distances.pow(2))
    for image, (image_distances, image_nearest) in enumerate(zip(distances.view(3, 64), nearest.view(3, 64))):
        worst = image_distances.argmax()
        bank_patch = model.memory_bank_[image_nearest[worst]]
        _, support = torch.cdist(bank_patch[None], model.memory_bank_).topk(4, largest=False)
        neighbours = torch.linalg.vector_norm(features[64 * image + worst] - model.memory_bank_[support[0]], dim=-1)
        assert torch.equal(image_scores[image], image_distances[worst] * (1 - torch.softmax(neighbours, dim=0)[0]))


def test_inference_features_do_not_depend_on_the_batch_size_or_the_thread_count() -> None:
    """PyTorch runs 1x1 convolutions natively on one thread with fewer than 16 images, rounding
    otherwise than oneDNN; the inference copy keeps every convolution on oneDNN."""
    extractor = create_extractor("resnet18", ["layer2", "layer3"], False, None, seed=0)
    network = extractor.folded()
    assert network is not extractor
    images = torch.randn(17, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            expected = network(images)
            for count, batch in ((1, 1), (1, 5), (2, 3), (1, 17)):
                torch.set_num_threads(count)
                parts = [network(part) for part in images.split(batch)]
                assert all(torch.equal(torch.cat(level), want) for level, want in zip(zip(*parts), expected))
    finally:
        torch.set_num_threads(threads)


def test_inference_copy_drops_the_stages_after_the_last_layer() -> None:
    extractor = create_extractor("tf_efficientnet_lite0", ["blocks.1", "blocks.2"], False, None, seed=0)
    network = extractor.folded()
    assert len(network.model.blocks) == 3 < len(extractor.model.blocks)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(network(images), extractor(images)))
    assert any(name.startswith("model.blocks.6.") for name in extractor.state_dict())  # saved models keep all


def _regions(labelled: np.ndarray) -> list[np.ndarray]:
    return [labelled == k for k in range(1, labelled.max() + 1)]


def test_threshold_rules() -> None:
    good = np.arange(100, dtype=float)
    assert good_quantile_threshold(good, 0.05) == pytest.approx(94.05)
    assert choose_threshold(good, None, 0.01) == (pytest.approx(98.01), "good-quantile")
    threshold, rule = choose_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.8, 0.9]), 0.01)
    assert rule == "f1-optimal" and threshold == 0.25  # F1 6/7 at 0.25 beats 0.8 at 0.8
    assert best_f1_threshold(np.array([0.1, 0.9]), np.array([0, 1])) == (0.9, 1.0)


def test_target_recall_is_the_highest_threshold_that_reaches_it() -> None:
    defects = np.array([0.9, 0.5, 0.7, 0.7, 0.2, 0.8, 0.3, 0.6, 0.4, 0.1])
    for target, expected in [(0.1, 0.9), (0.3, 0.7), (0.4, 0.7), (0.7, 0.4), (0.75, 0.3), (1.0, 0.1)]:
        threshold = target_recall_threshold(defects, target)
        assert threshold == expected, target
        assert (defects >= threshold).mean() >= target
        higher = defects[defects > threshold]
        assert higher.size == 0 or (defects >= higher.min()).mean() < target
    assert choose_threshold(np.array([0.0, 0.35]), defects, 0.01, target_recall=0.7) == (0.4, "target-recall")
    with pytest.raises(ValueError, match="needs defect scores"):
        choose_threshold(np.array([0.0, 0.35]), None, 0.01, target_recall=0.7)


def test_flagged_shares_have_wilson_intervals() -> None:
    scores = np.r_[np.ones(8), np.zeros(2)]
    assert flagged_share_ci95(scores, 0.5) == pytest.approx([0.4901625, 0.9433178], abs=1e-6)  # 8 of 10
    assert flagged_share_ci95(scores, 2.0) == pytest.approx([0.0, 0.2775328], abs=1e-6)  # none of 10
    assert flagged_share_ci95(scores, 0.0) == pytest.approx([0.7224672, 1.0], abs=1e-6)  # all 10


def test_default_layers_follow_the_stride_and_unknown_layers_are_named() -> None:
    assert resolve_layers("resnet18", None, PatchCore.default_strides) == ["layer2", "layer3"]
    assert resolve_layers("resnet18", None, Padim.default_strides) == ["layer1", "layer2", "layer3"]
    assert resolve_layers("tf_efficientnet_lite0", None, PatchCore.default_strides) == ["blocks.2", "blocks.4"]
    assert resolve_layers("resnet18", ["layer3", "layer1"], Padim.default_strides) == ["layer1", "layer3"]
    with pytest.raises(UserError, match="unknown layer.*layer9.*choose from act1, layer1"):
        resolve_layers("resnet18", ["layer9"], PatchCore.default_strides)


def test_weights_file_loads_like_train_and_offline_weights_fail_with_one_message(tmp_path) -> None:
    source = timm.create_model("test_resnet", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    extractor = create_extractor("test_resnet", ["layer1", "layer2"], True, tmp_path / "w.pth", seed=0)
    image = torch.randn(1, 3, 64, 64)
    expected = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2))
    expected.load_state_dict({k: v for k, v in source.state_dict().items() if k in expected.state_dict()})
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(extractor(image), expected.eval()(image)))
    with pytest.raises(UserError, match="--weights FILE.*--no-pretrained"):
        create_extractor("test_resnet", ["layer1"], True, None, seed=0)
    with pytest.raises(UserError, match="weights file not found"):
        create_extractor("test_resnet", ["layer1"], True, tmp_path / "missing.safetensors", seed=0)


def test_separable_blur_equals_torchvisions_gaussian_blur() -> None:
    import torch.nn.functional as F
    from torchvision.transforms.v2.functional import gaussian_blur

    from visiontune.anomaly.components.anomaly_map import smooth_anomaly_map

    for height, width in ((8, 8), (7, 9)):
        patches = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
        upsampled = F.interpolate(patches[:, None], size=(64, 64), mode="bilinear", align_corners=False)
        expected = gaussian_blur(upsampled, kernel_size=[33, 33], sigma=[4.0, 4.0])[:, 0]
        torch.testing.assert_close(smooth_anomaly_map(patches, 64, 4.0), expected, atol=1e-5, rtol=1e-5)


def test_image_score_is_the_mean_of_the_top_share_of_the_smoothed_map() -> None:
    from visiontune.anomaly.components.anomaly_map import MapScoring, smooth_anomaly_map

    patches = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(1))
    own = torch.tensor([5.0, 7.0])
    maps = smooth_anomaly_map(patches, 32, 8.0)
    top = maps.flatten(1).sort(dim=1, descending=True).values[:, :10]  # 1% of 1024 pixels
    scores, returned = MapScoring().apply(patches, own, 32)
    torch.testing.assert_close(returned, maps)
    torch.testing.assert_close(scores, top.mean(dim=1))
    assert torch.equal(MapScoring(image_score="max").apply(patches, own, 32)[0], maps.flatten(1).amax(1))
    assert torch.equal(MapScoring(image_score="detector").apply(patches, own, 32)[0], own)
    assert torch.equal(MapScoring(image_score="detector").apply(patches, None, 32)[0], maps.flatten(1).amax(1))
    with pytest.raises(ValueError, match="image_score must be one of"):
        MapScoring(image_score="mean")
    tiny = MapScoring().apply(patches, None, 16)[1]  # a kernel wider than the map is cut, not an error
    assert tiny.shape == (2, 16, 16) and torch.isfinite(tiny).all()
