"""The evaluation's intervals against textbook values; the bootstrap seeded and covering the mean."""

import random

import pytest

from components.rlhf.stats import bootstrap_mean, mean_summary, paired_bootstrap_diff, rate_summary, wilson


@pytest.mark.parametrize("k, n, expected", [(0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)),
                                            (5, 10, (0.2366, 0.7634)), (81, 263, (0.2553, 0.3662))])
def test_wilson_textbook_values(k, n, expected):
    assert wilson(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k <= n"):
        wilson(11, 10)


def test_bootstrap_mean_covers_the_mean_and_is_seeded():
    rng = random.Random(1)
    xs = [rng.random() for _ in range(100)]
    lo, hi = bootstrap_mean(xs)
    mean = sum(xs) / len(xs)
    assert lo < mean < hi and 0.05 < hi - lo < 0.2  # ~ 2 x 1.96 x 0.29 / 10 = 0.11
    assert bootstrap_mean(xs) == (lo, hi) and bootstrap_mean(xs, seed=1) != (lo, hi)
    assert bootstrap_mean([0.5] * 7) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_mean([])


def test_paired_diff_cancels_shared_prompt_spread():
    rng = random.Random(2)
    base = [rng.random() for _ in range(80)]  # prompt difficulty varies a lot ...
    better = [b + 0.05 for b in base]  # ... but the candidate is uniformly 0.05 better
    diff, (lo, hi) = paired_bootstrap_diff(better, base)
    assert diff == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    lost = [1.0] * 27 + [0.0] * 3  # 3 of 30 refusals lost
    diff, (lo, hi) = paired_bootstrap_diff(lost, [1.0] * 30)
    assert diff == pytest.approx(-0.1) and lo < -0.1 and hi <= 0.0
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap_diff([1.0], [1.0, 0.0])


def test_summaries():
    assert rate_summary("r", [1, 0, 1, 1]) == {"r": 0.75, "r_n": 4, "r_ci95": list(wilson(3, 4))}
    assert rate_summary("r", []) == {"r": 0.0, "r_n": 0, "r_ci95": [0.0, 1.0]}
    summary = mean_summary("m", [0.2, 0.4, 0.9])
    assert summary["m"] == pytest.approx(0.5) and summary["m_n"] == 3 and summary["m_ci95"][0] < 0.5
