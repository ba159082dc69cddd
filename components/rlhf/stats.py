"""95% intervals for the evaluation's metrics: Wilson for rates (k of n), the percentile bootstrap for means, and the
paired bootstrap for the difference of two models' means over the same prompts (the gate). Seeded: the same inputs
always give the same interval.

Clustered by item. Eval prompts are phrasings of held-out items (a harmful topic is asked in ~4 phrasings), and a
model answers the phrasings of one item alike: 100 refusal prompts are 23 topics, and a prompt-level interval claims
a precision the eval set does not have. Given each value's item (`groups`), means and differences resample whole items
(the cluster bootstrap), and a rate's Wilson interval uses the effective sample size n / deff (Kish's design effect,
from the spread of the items' rates; at a rate of 0 or 1, where it cannot be estimated, the worst case: one
observation per item)."""

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
    return _wilson_rate(k / n, n, z)


def _wilson_rate(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson interval of rate p over a (possibly fractional, effective) sample size n > 0."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _resampled_means(values: np.ndarray, groups, seed: int, resamples: int) -> np.ndarray:
    """Means of `resamples` resamples, each drawing as many groups as there are, with replacement, and averaging all
    their values (groups None: every value its own group, the plain bootstrap). One generator per call, so an interval
    does not depend on which intervals were computed before it."""
    if groups is None:
        groups = np.arange(len(values))
    elif len(groups) != len(values):
        raise ValueError(f"need one group per value: {len(values)} values, {len(groups)} groups")
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums, counts = np.bincount(inverse, weights=values), np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, len(sums), size=(min(_CHUNK, resamples - start), len(sums)))
        means.append(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    return np.concatenate(means)


def design_effect(values, groups) -> float:
    """Kish's design effect of a mean of values clustered in groups: the variance of the mean with whole groups as
    the sampling unit over that of independent values, between 1 and its value when a group's values always agree
    (sum of squared group sizes / n: n / groups for equal groups), which is also the answer when there is no spread
    to estimate it from (all values equal)."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    counts = np.bincount(inverse)
    n, g = len(values), len(counts)
    agree = float((counts ** 2).sum() / n) if n else 1.0
    if g == n or values.var() == 0 or g == 1:
        return 1.0 if g == n else agree
    residuals = np.bincount(inverse, weights=values - values.mean())
    clustered = g / (g - 1) * (residuals ** 2).sum() / n ** 2
    return float(min(agree, max(1.0, clustered / (values.var() / n))))


def _percentile_ci(means: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def bootstrap_mean(xs, seed: int = SEED, resamples: int = RESAMPLES, groups=None) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of xs (non-empty); groups: each value's item, resampled whole."""
    values = np.asarray(xs, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_mean: no values")
    return _percentile_ci(_resampled_means(values, groups, seed, resamples))


def paired_bootstrap_diff(a, b, seed: int = SEED, resamples: int = RESAMPLES, groups=None,
                          ) -> tuple[float, tuple[float, float]]:
    """mean(a) - mean(b) and its percentile bootstrap 95% interval, a[i] and b[i] being the same prompt's values
    (resampled together: the prompt-to-prompt spread both models share cancels out); groups: each prompt's item,
    resampled whole."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap_diff: need two non-empty lists of equal length, got {a.shape}, {b.shape}")
    diff = a - b
    return float(diff.mean()), _percentile_ci(_resampled_means(diff, groups, seed, resamples))


def _items(name: str, groups) -> dict:
    return {} if groups is None else {f"{name}_items": len(set(groups))}


def rate_summary(name: str, hits: list, groups=None) -> dict:
    """{name: k/n, name_n: n, name_ci95: Wilson interval} for a list of 0/1 outcomes (0.0 when n = 0); with groups
    (each outcome's item), name_items and the Wilson interval at the effective sample size n / design_effect."""
    n, k = len(hits), int(sum(bool(h) for h in hits))
    if groups is not None and len(groups) != n:
        raise ValueError(f"need one group per outcome: {n} outcomes, {len(groups)} groups")
    if n and groups is not None:  # design_effect is 1 for one outcome per item: Wilson's interval as is
        ci = _wilson_rate(k / n, n / design_effect([float(bool(h)) for h in hits], groups))
    else:
        ci = wilson(k, n)
    return {name: k / n if n else 0.0, f"{name}_n": n, f"{name}_ci95": list(ci), **_items(name, groups)}


def mean_summary(name: str, xs: list, seed: int = SEED, groups=None) -> dict:
    """{name: mean, name_n: n, name_ci95: bootstrap interval} for scores in [0, 1] (n = 0: 0.0 in (0, 1)); with groups
    (each score's item), name_items and the cluster bootstrap."""
    n = len(xs)
    ci = list(bootstrap_mean(xs, seed, groups=groups)) if n else [0.0, 1.0]
    return {name: sum(xs) / n if n else 0.0, f"{name}_n": n, f"{name}_ci95": ci, **_items(name, groups)}
