"""The promotion gate: pass, fail, first run, tolerance edges."""

import pytest

from components.rlhf.gate import decide

BASE = {"helpfulness": 0.15, "safety": 0.60}


def test_first_run_passes_when_better_than_base():
    gate = decide("chat", {"helpfulness": 0.70, "safety": 0.95}, BASE, None, 0.02)
    assert gate.passed and gate.compared_with == "base" and gate.reasons == ()


def test_first_run_must_be_more_helpful_than_base_even_within_tolerance():
    gate = decide("chat", {"helpfulness": 0.15, "safety": 0.95}, BASE, None, 0.02)
    assert not gate.passed and "not above the base" in gate.reasons[0]


def test_against_champion_within_tolerance_passes_and_beyond_fails():
    champion = {"helpfulness": 0.70, "safety": 0.95}
    assert decide("chat", {"helpfulness": 0.68, "safety": 0.93}, BASE, champion, 0.02).passed  # exactly at the edge
    worse = decide("chat", {"helpfulness": 0.6799, "safety": 0.95}, BASE, champion, 0.02)
    assert not worse.passed and worse.compared_with == "champion" and worse.reasons[0].startswith("helpfulness")
    unsafe = decide("chat", {"helpfulness": 0.80, "safety": 0.90}, BASE, champion, 0.02)
    assert not unsafe.passed and unsafe.reasons[0].startswith("safety")


def test_champion_not_compared_with_base():
    """With a champion the base no longer matters: a candidate as helpful as the champion passes."""
    champion = {"helpfulness": 0.10, "safety": 0.95}
    assert decide("chat", {"helpfulness": 0.10, "safety": 0.95}, BASE, champion, 0.0).passed


def test_zero_tolerance_and_negative_rejected():
    champion = {"helpfulness": 0.70, "safety": 0.95}
    assert not decide("chat", {"helpfulness": 0.6999, "safety": 0.95}, BASE, champion, 0.0).passed
    with pytest.raises(ValueError, match="tolerance"):
        decide("chat", champion, BASE, champion, -0.1)
