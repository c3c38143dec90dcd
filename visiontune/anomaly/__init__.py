"""Unsupervised defect detection: fit on good images only, score new ones, evaluate on labelled ones.

    >>> from visiontune import anomaly
    >>> model = anomaly.fit("data/train/good", method="patchcore", out="models/bottle")
    >>> anomaly.predict("models/bottle", ["new/"], out="scores.csv", heatmaps="heat/")
    >>> anomaly.evaluate("models/bottle", "data/")["image_auroc"]
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__, submod_attrs={
        "base": ["AnomalyModel"], "detectors": ["DETECTORS"], "padim": ["Padim"], "patchcore": ["PatchCore"],
        "reverse_distillation": ["ReverseDistillation"],
        "workflow": ["evaluate", "fit", "load", "predict", "split_holdout"],
    },
)
