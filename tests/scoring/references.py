"""Numpy references that several scorer test modules use (explicit loops; they never call the project's
helpers): log-sum-exp, the log of the maximum softmax probability, the cosine."""

from __future__ import annotations

import math

import numpy as np


def ref_logsumexp(logits: np.ndarray) -> np.ndarray:  # (N, C) -> (N,)
    out = np.empty(len(logits))
    for i, row in enumerate(logits):
        m = max(row)
        out[i] = m + math.log(sum(math.exp(v - m) for v in row))
    return out


def ref_msp(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The log of the maximum softmax probability (what msp scores: the same order as the probability),
    ``-log1p(sum of the other classes' exp(z - max))``."""
    out = np.empty(len(logits))
    for i, row in enumerate(logits):
        z = [v / temperature for v in row]
        top = z.index(max(z))
        out[i] = -math.log1p(sum(math.exp(v - z[top]) for j, v in enumerate(z) if j != top))
    return out


def ref_output(logits: np.ndarray, output: str) -> np.ndarray:
    return ref_logsumexp(logits) if output == "energy" else ref_msp(logits)


def ref_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return float(sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb))
