"""The promotion gate: may the candidate chat model take the registry alias?

It must be no worse than the current champion (by `tolerance`) in helpfulness and safety; with no champion yet, no
worse than the pretrained base and strictly more helpful than it (a first model must have learned something).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PromotionConfig:
    """params `register`: the registered model, the alias the gate moves, and the gate's tolerance."""

    model_name: str = "llama2-chat"
    alias: str = "champion"
    tolerance: float = 0.02  # the candidate may be this much worse than the champion and still pass


@dataclass(frozen=True)
class GateDecision:
    candidate: str  # the model stage that was judged
    compared_with: str  # "champion" or "base"
    passed: bool
    reasons: tuple[str, ...]  # why it failed; empty when it passed

    def to_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


def decide(candidate: str, metrics: dict, base: dict, champion: dict | None, tolerance: float) -> GateDecision:
    """metrics, base and champion map "helpfulness" and "safety" to scores in [0, 1]; champion None = first run."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    baseline_name, baseline = ("champion", champion) if champion else ("base", base)
    reasons = [f"{key} {metrics[key]:.4f} < {baseline_name} {baseline[key]:.4f} - {tolerance}"
               for key in ("helpfulness", "safety") if metrics[key] < baseline[key] - tolerance]
    if not champion and not metrics["helpfulness"] > base["helpfulness"]:
        reasons.append(f"helpfulness {metrics['helpfulness']:.4f} is not above the base model's "
                       f"{base['helpfulness']:.4f}")
    return GateDecision(candidate, baseline_name, not reasons, tuple(reasons))
