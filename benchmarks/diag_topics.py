"""How much of "refuse or answer" on held-out topics the training topics' words decide: a naive Bayes classifier over
the words of the world's training topics (harmful vs benign look-alike), scored on the held-out topics. It bounds
what learning from the fine-tuning data's topics alone can reach: a topic whose words never occur in a training
topic, or occur as often on both sides ("shoot", "strike", "poison"), cannot be told apart from them.

    python benchmarks/diag_topics.py            # the tiny world (params.yaml data.world)
"""

from __future__ import annotations

import collections
import math

from components.data.tasks import prompt_pools
from components.data.world import WorldConfig, build_world
from components.rlhf.stats import wilson
from flows._stage import load_params

# Words every phrase has; they carry no class.
STOP = frozenset("a an the my of to in on at for and with from into it up out down off over so".split())


def features(topic: str) -> set[str]:
    return {w for w in "".join(c if c.isalnum() else " " for c in topic.lower()).split() if w not in STOP}


class NaiveBayes:
    """Bernoulli-style naive Bayes over a topic's words, add-one smoothed; words unseen in training are skipped."""

    def __init__(self, topics: list[tuple[str, int]]):
        self.n = collections.Counter(y for _, y in topics)
        self.counts = {y: collections.Counter() for y in (0, 1)}
        for topic, y in topics:
            self.counts[y].update(features(topic))
        self.vocab = set(self.counts[0]) | set(self.counts[1])

    def log_odds(self, topic: str) -> float:
        """log P(harmful | words) - log P(benign | words)."""
        odds = math.log(self.n[1] / self.n[0])
        for w in features(topic) & self.vocab:
            odds += math.log((self.counts[1][w] + 1) / (self.n[1] + 2))
            odds -= math.log((self.counts[0][w] + 1) / (self.n[0] + 2))
        return odds


def main() -> None:
    cfg = WorldConfig.from_dict(load_params()["data"].get("world"))
    train, held_out = prompt_pools(cfg, build_world(cfg))

    def topics(pools, key):
        return sorted({p.reference["topic"] for p in pools[key]})

    model = NaiveBayes([(t, 1) for t in topics(train, "harmful")] + [(t, 0) for t in topics(train, "benign_lookalike")])
    harmful, benign = topics(held_out, "harmful"), topics(held_out, "benign_lookalike")
    refused = sum(model.log_odds(t) > 0 for t in harmful)
    false_refused = sum(model.log_odds(t) > 0 for t in benign)
    right, n = refused + len(benign) - false_refused, len(harmful) + len(benign)
    unseen = sum(not features(t) & model.vocab for t in harmful + benign)

    def rate(k: int, m: int) -> str:
        lo, hi = wilson(k, m)
        return f"{k / m:.2f} [{lo:.2f}, {hi:.2f}] ({k}/{m})"

    print(f"naive Bayes on the words of {sum(model.n.values())} training topics "
          f"({model.n[1]} harmful, {model.n[0]} benign look-alikes), scored on the held-out topics:")
    print(f"  accuracy {rate(right, n)}")
    print(f"  refuses held-out harmful topics {rate(refused, len(harmful))}")
    print(f"  refuses held-out benign look-alikes {rate(false_refused, len(benign))}")
    print(f"  held-out topics with no word of any training topic: {unseen}")


if __name__ == "__main__":
    main()
