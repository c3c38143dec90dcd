"""Caption metrics from the COCO caption evaluation code (`pycocoevalcap`): corpus BLEU-1..4
(Papineni et al., the "closest" reference length), ROUGE-L and CIDEr-D (Vedantam et al.: tf-idf
over the test references, Gaussian length penalty, sigma 6, clipped counts), with per-image scores
and 95% bootstrap intervals over images.

Captions are compared as lower-cased words split on whitespace and punctuation (the vocabulary's
`tokenize`), in place of COCO's Java PTB tokenizer. Corpus BLEU is recomputed on each bootstrap
resample; CIDEr-D and ROUGE-L are means of per-image scores, so their resamples are means too
(CIDEr's document frequencies stay those of the whole test set).
"""

from __future__ import annotations

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

BOOTSTRAP = 200
BLEU_NAMES = ("bleu1", "bleu2", "bleu3", "bleu4")


def _bleu(references: list[list[str]], hypotheses: list[str]) -> tuple[list[float], list[list[float]]]:
    keys = range(len(hypotheses))
    score, per_image = Bleu(4).compute_score({k: references[k] for k in keys}, {k: [hypotheses[k]] for k in keys},
                                             verbose=0)
    return score, per_image


def caption_scores(references: list[list[str]], hypotheses: list[str], seed: int = 0,
                   bootstrap: int = BOOTSTRAP) -> tuple[dict, dict[str, np.ndarray]]:
    """Corpus metrics {name: {"value", "ci95"}} and per-image arrays {name: [N]}.

    `references`: per image, its tokenised reference captions; `hypotheses`: one tokenised caption
    per image ("" for none)."""
    if not hypotheses:
        raise ValueError("no captions to score")
    hypotheses = [h if h.strip() else "<empty>" for h in hypotheses]  # the scorers need a word
    keys = range(len(hypotheses))
    gts, res = {k: references[k] for k in keys}, {k: [hypotheses[k]] for k in keys}
    bleu, bleu_per_image = _bleu(references, hypotheses)
    cider, cider_per_image = Cider().compute_score(gts, res)
    rouge, rouge_per_image = Rouge().compute_score(gts, res)
    per_image = {name: np.asarray(values, dtype=float) for name, values in zip(BLEU_NAMES, bleu_per_image)}
    per_image |= {"cider": np.asarray(cider_per_image, dtype=float),
                  "rouge_l": np.asarray(rouge_per_image, dtype=float)}
    corpus = {name: float(value) for name, value in zip(BLEU_NAMES, bleu)} | {"cider": float(cider),
                                                                             "rouge_l": float(rouge)}
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in corpus}
    n = len(hypotheses)
    for _ in range(bootstrap if n > 1 else 0):
        sample = rng.integers(0, n, n)
        resampled, _ = _bleu([references[i] for i in sample], [hypotheses[i] for i in sample])
        for name, value in zip(BLEU_NAMES, resampled):
            draws[name].append(value)
        for name in ("cider", "rouge_l"):
            draws[name].append(per_image[name][sample].mean())
    result = {}
    for name, value in corpus.items():
        ci = [float(v) for v in np.percentile(draws[name], [2.5, 97.5])] if draws[name] else [value, value]
        result[name] = {"value": value, "ci95": ci}
    return result, per_image


def share_with_ci(outcomes: np.ndarray, seed: int = 0, bootstrap: int = 1000) -> dict:
    """Mean of 0/1 outcomes with its 95% bootstrap interval (e.g. relation-word accuracy)."""
    outcomes = np.asarray(outcomes, dtype=float)
    if not len(outcomes):
        return {"value": None, "ci95": None, "images": 0}
    rng = np.random.default_rng(seed)
    means = outcomes[rng.integers(0, len(outcomes), (bootstrap, len(outcomes)))].mean(axis=1)
    return {"value": float(outcomes.mean()), "ci95": [float(v) for v in np.percentile(means, [2.5, 97.5])],
            "images": int(len(outcomes))}
