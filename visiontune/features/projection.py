"""Projecting pooled features to fewer dimensions, fitted on the training rows only, in chunks."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import IncrementalPCA
from sklearn.random_projection import GaussianRandomProjection

from visiontune.errors import UserError

PROJECTIONS = ("random", "pca")
CHUNK_ROWS = 2048


def fit_projection(kind: str, dim: int, features: np.ndarray, train_rows: np.ndarray, seed: int):
    """A fitted scikit-learn transformer: seeded Gaussian random projection, or PCA streamed over
    the training rows of `features` (which may be memory-mapped) with IncrementalPCA."""
    if kind not in PROJECTIONS:
        raise UserError(f"--projection must be random or pca, not {kind!r}")
    if dim < 1:
        raise UserError(f"--project-dim must be at least 1, not {dim}")
    if kind == "random":
        return GaussianRandomProjection(n_components=dim, random_state=seed).fit(features[:1])
    if dim > min(len(train_rows), features.shape[1]):
        raise UserError(f"--projection pca to {dim} dimensions needs at least {dim} training images and "
                        f"feature dimensions (have {len(train_rows)} images, {features.shape[1]} dimensions)")
    pca = IncrementalPCA(n_components=dim)
    step = max(dim, CHUNK_ROWS)
    starts = list(range(0, len(train_rows), step))
    if len(starts) > 1 and len(train_rows) - starts[-1] < dim:
        starts.pop()  # a last chunk smaller than dim joins the one before it
    for start, end in zip(starts, [*starts[1:], len(train_rows)]):
        pca.partial_fit(features[np.sort(train_rows[start:end])])
    return pca


def project_chunks(transformer, features: np.ndarray):
    """Transformed rows, CHUNK_ROWS at a time, as float32."""
    for start in range(0, len(features), CHUNK_ROWS):
        yield transformer.transform(np.asarray(features[start:start + CHUNK_ROWS])).astype(np.float32)
