"""95% intervals for the evaluation's metrics: Wilson for rates (k of n), the percentile bootstrap for means, and the
paired bootstrap for the difference of two models' means over the same prompts (the gate). Seeded: the same inputs
always give the same interval."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # standard normal 97.5% quantile
RESAMPLES = 2000
SEED = 0
_CHUNK = 250  # resamples drawn at once: (250, n) indices, bounded memory for large eval sets


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a rate k/n; n = 0 gives the whole range (0, 1)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _bootstrap_means(values: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of values' rows; one generator per call, so an interval
    does not depend on which intervals were computed before it."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, resamples - start), n))
        means.append(values[idx].mean(axis=1))
    return np.concatenate(means)


def _percentile_ci(means: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def bootstrap_mean(xs, seed: int = SEED, resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of xs (non-empty)."""
    values = np.asarray(xs, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_mean: no values")
    return _percentile_ci(_bootstrap_means(values, seed, resamples))


def paired_bootstrap_diff(a, b, seed: int = SEED, resamples: int = RESAMPLES) -> tuple[float, tuple[float, float]]:
    """mean(a) - mean(b) and its percentile bootstrap 95% interval, a[i] and b[i] being the same prompt's values
    (resampled together: the prompt-to-prompt spread both models share cancels out)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap_diff: need two non-empty lists of equal length, got {a.shape}, {b.shape}")
    diff = a - b
    return float(diff.mean()), _percentile_ci(_bootstrap_means(diff, seed, resamples))


def rate_summary(name: str, hits: list) -> dict:
    """{name: k/n, name_n: n, name_ci95: Wilson interval} for a list of 0/1 outcomes (0.0 when n = 0)."""
    n, k = len(hits), int(sum(bool(h) for h in hits))
    return {name: k / n if n else 0.0, f"{name}_n": n, f"{name}_ci95": list(wilson(k, n))}


def mean_summary(name: str, xs: list, seed: int = SEED) -> dict:
    """{name: mean, name_n: n, name_ci95: bootstrap interval} for scores in [0, 1] (n = 0: 0.0 in (0, 1))."""
    n = len(xs)
    ci = list(bootstrap_mean(xs, seed)) if n else [0.0, 1.0]
    return {name: sum(xs) / n if n else 0.0, f"{name}_n": n, f"{name}_ci95": ci}
