"""The promotion gate: each metric on its own, the interval rule, the tolerance, which baseline and why."""

import pytest

from components.rlhf.gate import GATED, choose_baseline, decide

N = 40


def values(helpful=0.7, refused=1.0, false_refused=0.0, safe=1.0, n=N):
    """Per-prompt values with the given means (n prompts per metric; 0/1 rates as hits first)."""
    def rate(p):
        k = round(p * n)
        return [1.0] * k + [0.0] * (n - k)
    return {"helpfulness": [helpful] * n, "refusal_rate_harmful": rate(refused),
            "false_refusal_rate": rate(false_refused), "safety": rate(safe)}


def test_equal_models_pass_every_metric_and_record_the_comparison():
    gate = decide("chat", values(helpful=0.5), "sft", values(helpful=0.5), 0.02, "no champion yet")
    assert gate.passed and gate.reasons == () and gate.compared_with == "sft"
    d = gate.to_dict()
    assert set(d["metrics"]) == set(GATED) and d["baseline_reason"] == "no champion yet"
    assert d["metrics"]["helpfulness"] == {"candidate": 0.5, "baseline": 0.5, "diff": 0.0, "diff_ci95": [0.0, 0.0],
                                           "n": N, "higher_is_better": True, "passed": True, "items": None}


@pytest.mark.parametrize("metric, worse", [("helpfulness", {"helpful": 0.6}),
                                           ("refusal_rate_harmful", {"refused": 0.8}),
                                           ("false_refusal_rate", {"false_refused": 0.2}), ("safety", {"safe": 0.8})])
def test_each_metric_fails_on_its_own(metric, worse):
    """A clear loss in one metric fails the gate even when the others improve (no folding into one number)."""
    better = {"helpful": 0.9, "refused": 1.0, "false_refused": 0.0, "safe": 1.0}
    base = values(helpful=0.7, refused=0.9, false_refused=0.1, safe=0.9)
    gate = decide("chat", values(**{**better, **worse}), "champion", base, 0.02)
    failed = [c.metric for c in gate.checks if not c.passed]
    assert not gate.passed and failed == [metric] and gate.reasons[0].startswith(metric)


def test_lower_is_better_for_false_refusals():
    gate = decide("chat", values(false_refused=0.0), "sft", values(false_refused=0.3), 0.02)
    check = {c.metric: c for c in gate.checks}["false_refusal_rate"]
    assert gate.passed and check.diff == pytest.approx(-0.3) and check.diff_ci95[1] < 0 and not check.higher_is_better


def test_a_loss_within_noise_passes():
    """2 of 40 refusals lost: beyond the tolerance in the point estimate, but the interval reaches 0."""
    gate = decide("chat", values(refused=0.95), "champion", values(refused=1.0), 0.02)
    check = {c.metric: c for c in gate.checks}["refusal_rate_harmful"]
    assert check.diff == pytest.approx(-0.05) and check.diff_ci95[1] == 0.0 and gate.passed


def test_a_loss_in_few_items_is_judged_by_item():
    """8 of 40 refusals lost, all in 2 of 5 topics (8 phrasings each): at the prompt level significant, but 5 topics
    cannot tell it from noise; the reason names the items."""
    items = {m: [f"topic:{i // 8}" for i in range(N)] for m in GATED}
    candidate, baseline = values(refused=0.8), values(refused=1.0)
    assert not decide("chat", candidate, "champion", baseline, 0.02).passed
    gate = decide("chat", candidate, "champion", baseline, 0.02, items=items)
    check = {c.metric: c for c in gate.checks}["refusal_rate_harmful"]
    assert gate.passed and check.items == 5 and check.diff == pytest.approx(-0.2) and check.diff_ci95[1] == 0.0
    spread = {m: [f"topic:{i % 20}" for i in range(N)] for m in GATED}  # 20 topics, one loss each in 8 of them
    gate = decide("chat", candidate, "champion", baseline, 0.02, items=spread)
    assert not gate.passed and "20 items" in gate.reasons[0]


def test_significant_loss_within_tolerance_passes_and_beyond_fails():
    """A uniform loss is significant at any size (the interval is one point); the tolerance decides."""
    assert decide("chat", values(helpful=0.68), "champion", values(helpful=0.70), 0.02).passed  # at the edge
    worse = decide("chat", values(helpful=0.6799), "champion", values(helpful=0.70), 0.02)
    assert not worse.passed and worse.reasons[0].startswith("helpfulness") and "tolerance 0.02" in worse.reasons[0]
    assert not decide("chat", values(helpful=0.6999), "champion", values(helpful=0.70), 0.0).passed


def test_first_run_vs_sft_passes_when_at_least_as_good():
    sft = values(helpful=0.5, refused=0.9, false_refused=0.1, safe=0.95)
    assert decide("chat", values(helpful=0.5, refused=0.9, false_refused=0.1, safe=0.95), "sft", sft, 0.02).passed
    assert decide("chat", values(helpful=0.6, refused=1.0, false_refused=0.05, safe=1.0), "sft", sft, 0.02).passed


def test_unmeasured_metric_passes_and_mismatched_prompts_rejected():
    empty = {**values(), "false_refusal_rate": []}
    gate = decide("chat", empty, "sft", empty, 0.02)
    assert gate.passed and {c.metric: c for c in gate.checks}["false_refusal_rate"].n == 0
    with pytest.raises(ValueError, match="same prompts"):
        decide("chat", values(n=N), "sft", values(n=N + 1), 0.02)
    with pytest.raises(ValueError, match="tolerance"):
        decide("chat", values(), "sft", values(), -0.1)


def test_choose_baseline():
    assert choose_baseline(None, "tiny") == ("sft", "no champion yet: compared with the SFT model")
    other = choose_baseline({"version": 3, "tags": {"profile": "ci"}}, "tiny")
    assert other[0] == "sft" and "version 3 has profile 'ci'" in other[1] and "'tiny'" in other[1]
    untagged = choose_baseline({"version": 1, "tags": {}}, "tiny")
    assert untagged[0] == "sft" and "no profile tag" in untagged[1]
    assert choose_baseline({"version": 4, "tags": {"profile": "tiny"}}, "tiny")[0] == "champion"


def test_make_run_says_whether_the_gate_moved_the_champion():
    from components.track.tracking import gate_line

    passed = {"passed": True, "compared_with": "sft", "metrics": {"helpfulness": {"passed": True}}}
    failed = {"passed": False, "compared_with": "sft",
              "metrics": {"helpfulness": {"passed": True}, "refusal_rate_harmful": {"passed": False}}}
    assert "passed" in gate_line(passed) and "champion" in gate_line(passed)
    line = gate_line(failed)
    assert "FAILED on refusal_rate_harmful" in line and "LLAMA2_MODEL_URI=checkpoints/chat make serve" in line
    assert gate_line({}) == ""
