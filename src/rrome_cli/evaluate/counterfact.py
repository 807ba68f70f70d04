"""ROME's CounterFact scores, from length-normalised NLLs of the new and the true answer.

For one prompt, ``nll_new`` and ``nll_true`` are the means over answer tokens of ``-log p`` of
``target_new`` and of the true answer. With ``p = exp(-nll)`` (the geometric-mean token
probability):

- efficacy / paraphrase score (ES, PS): ``1`` if ``nll_true > nll_new`` (the new answer is more
  likely), else ``0``; PS is the mean over the rephrased prompts.
- neighbourhood score (NS): ``1`` if ``nll_true < nll_new`` on a neighbour prompt, whose "true"
  answer is the locality answer and whose "new" answer is the request's ``target_new``.
- magnitudes (EM, PM, NM): differences of those probabilities, signed so that larger is better
  for the edit, as in ROME: ``EM = PM = p_new - p_true`` and ``NM = p_true - p_new``.
- S: the harmonic mean of the ES, PS and NS means (computed in the summary, not per request).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def prefers_new(nll_new: float, nll_true: float) -> float:
    """1.0 when the new answer is strictly more likely than the true one, else 0.0."""
    return float(nll_true > nll_new)


def prefers_true(nll_new: float, nll_true: float) -> float:
    """1.0 when the true answer is strictly more likely than the new one, else 0.0."""
    return float(nll_true < nll_new)


def probability_gap(nll_new: float, nll_true: float) -> float:
    """``p_new - p_true`` with ``p = exp(-nll)``."""
    return math.exp(-nll_new) - math.exp(-nll_true)


def rewrite_scores(nll_new: Sequence[float], nll_true: Sequence[float]) -> tuple[float, float]:
    """(score, magnitude) over prompts where the new answer should win: ES/EM or PS/PM."""
    pairs = list(zip(nll_new, nll_true, strict=True))
    score = sum(prefers_new(n, t) for n, t in pairs) / len(pairs)
    magnitude = sum(probability_gap(n, t) for n, t in pairs) / len(pairs)
    return score, magnitude


def neighbourhood_scores(
    nll_new: Sequence[float], nll_true: Sequence[float]
) -> tuple[float, float]:
    """(NS, NM) over neighbour prompts, where the true answer should keep winning."""
    pairs = list(zip(nll_new, nll_true, strict=True))
    score = sum(prefers_true(n, t) for n, t in pairs) / len(pairs)
    magnitude = sum(-probability_gap(n, t) for n, t in pairs) / len(pairs)
    return score, magnitude


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (the S score of a model that fails one part)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
