"""Frozen features of any backbone layer, and quick classifiers on them.

    >>> from visiontune import features
    >>> features.extract("data/", model="resnet50", layers=["layer3", "layer4"], out="feats.npz")
    >>> features.load_features("feats.npz")["features"].shape
    >>> features.probe("data/", model="resnet50", classifier="logreg")["val"]["accuracy"]
"""

from visiontune.features.extraction import extract
from visiontune.features.probes import CLASSIFIERS, probe
from visiontune.features.store import load_features

__all__ = ["CLASSIFIERS", "extract", "load_features", "probe"]
