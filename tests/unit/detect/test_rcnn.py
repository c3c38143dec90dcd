"""R-CNN end to end on tiny tiles: regions -> a 1-epoch classifier run on their CSV -> SVM and box
regression on its frozen features -> saved, loaded, and detecting the same boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import visiontune
from tests.conftest import TINY_OPTIONS
from visiontune.detect.annotations import load_annotations, split_detection_set
from visiontune.detect.proposals import propose
from visiontune.detect.rcnn import (
    FIT_FILE,
    WEIGHTS_FILE,
    RCNNOptions,
    fit_rcnn,
    load_rcnn,
)
from visiontune.detect.regions import REGIONS_CSV, regions
from visiontune.detect.synthetic import make_tiles
from visiontune.errors import UserError

RCNN_OPTIONS = dict(proposals="sliding", max_proposals=40, size=32, context=4, batch_size=32, svm_c=[0.01, 0.1],
                    negatives_per_image=30, regression_iou=0.4, regression_min_samples=2, device="cpu")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcnn")
    annotations = make_tiles(root / "tiles", 10, size=96, seed=0)
    dataset = load_annotations(annotations, root / "tiles" / "images")
    splits = split_detection_set(dataset, 0.3, 0.2, seed=0)
    summary = regions(root / "tiles" / "images", annotations, root / "regions", proposals="sliding", max_proposals=60,
                      max_negatives=6, size=32, context=4, val_fraction=0.3, test_fraction=0.2, progress=False)
    assert summary["notes"] == [], summary["notes"]
    run = visiontune.fit(str(root / "regions" / REGIONS_CSV), out=str(root / "run"),
                         **{**TINY_OPTIONS, "epochs": 1, "freeze_epochs": 0})
    options = RCNNOptions(classifier_run=run.dir, **RCNN_OPTIONS)
    detector = fit_rcnn(splits["train"], splits["val"], dataset.classes, root / "detector", options)
    return root, dataset, splits, options, detector


def images_of(splits) -> list[np.ndarray]:
    return [np.asarray(Image.open(t.path).convert("RGB")) for t in splits["test"] + splits["val"]]


def test_fit_save_load_detect_gives_identical_detections(fitted):
    root, dataset, splits, options, detector = fitted
    assert (root / "detector" / WEIGHTS_FILE).is_file() and (root / "detector" / FIT_FILE).is_file()
    fit = json.loads((root / "detector" / FIT_FILE).read_text())
    assert any(fit["svm"]["fitted"]) and max(fit["regression_samples"]) >= 2  # both heads are in the round trip
    assert not list((root / "detector").rglob("*.pkl")) and list((root / "detector" / "proposals").rglob("*.npy"))
    images = images_of(splits)
    first = detector.detect_batch(images)
    loaded = load_rcnn(root / "detector", {"rcnn": options.model_dump(mode="json")})
    assert loaded.classes == dataset.classes == ["crack", "blob"]
    second = loaded.detect_batch(images)
    assert len(first) == len(second) == len(images)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.labels, b.labels)
    for found, image in zip(first, images):
        assert (np.diff(found.scores) <= 0).all() and len(found.boxes) <= options.max_detections
        assert ((found.scores >= options.score_floor) & (found.scores <= 1)).all()
        assert set(found.labels.tolist()) <= {0, 1}
        assert (found.boxes[:, 2] <= image.shape[1]).all() and (found.boxes[:, 0] >= 0).all()


def test_classifier_scores_without_svm_or_regression(fitted):
    root, dataset, splits, options, _ = fitted
    plain = options.model_copy(update={"svm": False, "box_regression": False, "score_floor": 0.0})
    detector = fit_rcnn(splits["train"], [], dataset.classes, root / "plain", plain)
    image = images_of(splits)[0]
    found = detector.detect_batch([image])[0]
    proposals = propose(image, "sliding", options.max_proposals)
    _, probabilities = detector.encoder(image, proposals)
    assert len(found.boxes) > 0
    for box, score, label in zip(found.boxes, found.scores, found.labels):  # unmoved proposals, the run's probability
        row = int(np.flatnonzero((proposals == box).all(axis=1))[0])
        column = detector.encoder.labels.index(dataset.classes[label])
        assert score == pytest.approx(probabilities[row, column], abs=1e-6)


def test_a_run_without_the_detection_classes_is_one_message(fitted):
    root, _, splits, options, _ = fitted
    with pytest.raises(UserError, match="lack scratch"):
        fit_rcnn(splits["train"], [], ["crack", "scratch"], root / "other", options)


def test_damaged_weights_are_one_message(fitted, tmp_path):
    options = fitted[3]
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="damaged or truncated"):
        load_rcnn(tmp_path, {"rcnn": options.model_dump(mode="json")})
    with pytest.raises(UserError, match="no valid 'rcnn' options"):
        load_rcnn(tmp_path, {})
