"""The evaluation's intervals against textbook values; the bootstrap seeded and covering the mean."""

import random

import pytest

from components.rlhf.stats import (bootstrap_mean, design_effect, mean_summary, paired_bootstrap_diff, rate_summary,
                                  wilson)


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


def test_items_answered_alike_count_once():
    # 11 topics x 9 phrasings, each topic refused in every phrasing or in none: 11 observations, not 99.
    hits, groups = [], []
    for topic in range(11):
        hits += [topic < 9] * 9
        groups += [f"topic:{topic}"] * 9
    assert design_effect([float(h) for h in hits], groups) == pytest.approx(9.0)
    summary = rate_summary("r", hits, groups)
    assert summary["r_items"] == 11 and summary["r_n"] == 99
    assert summary["r_ci95"] == pytest.approx(list(wilson(9, 11)))  # as wide as 11 observations
    assert rate_summary("r", [True] * 99, groups)["r_ci95"] == pytest.approx(list(wilson(11, 11)))  # worst case
    # Phrasings that vary independently of their topic: no design effect, the prompt-level interval.
    rng = random.Random(3)
    independent = [rng.random() < 0.7 for _ in groups]
    assert design_effect([float(h) for h in independent], groups) < 1.5
    assert rate_summary("r", hits, [str(i) for i in range(99)])["r_ci95"] == list(wilson(81, 99))


def test_paired_diff_over_items_is_wider_when_items_move_together():
    # 3 of 11 topics flip from refused to answered, in all 9 of their phrasings.
    base, cand, groups = [], [], []
    for topic in range(11):
        base += [1.0] * 9
        cand += [0.0 if topic < 3 else 1.0] * 9
        groups += [topic] * 9
    diff, prompt_level = paired_bootstrap_diff(cand, base)
    same, by_item = paired_bootstrap_diff(cand, base, groups=groups)
    assert same == diff == pytest.approx(-3 / 11)
    assert by_item[0] < prompt_level[0] and by_item[1] >= prompt_level[1]
    assert by_item[1] - by_item[0] > 2 * (prompt_level[1] - prompt_level[0])  # ~sqrt(9) wider
    summary = mean_summary("m", cand, groups=groups)
    assert summary["m_items"] == 11 and summary["m_ci95"][1] - summary["m_ci95"][0] > 0.3
    with pytest.raises(ValueError, match="one group per value"):
        paired_bootstrap_diff(cand, base, groups=groups[:-1])
