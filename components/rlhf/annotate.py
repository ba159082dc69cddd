"""Iterative RLHF's new preferences (§3.2.1, RLHF-V1..V5): each round, answers to training prompts sampled from the
current policy (at two temperatures, as the paper samples its pairs from different model variants and temperatures),
labelled by the oracle as a human annotator would: of every two distinct answers to a prompt, the better by
oracle.preference_score, the rating level from the score gap (oracle.rating_for_gap), ties dropped. Two answers a
prompt are the paper's pair; more are a ranking, every two of which is a comparison (InstructGPT's K-way rankings):
more pairs, and fewer ties, from the same prompts. Rows have the world's preference schema (components/data/tables.py
SCHEMAS) plus `round`, the round whose policy wrote the answers; a round's table pools the previous round's (which
pooled its own predecessors'), so the reward models see every round's policy text.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field

import pyarrow as pa

from components.cluster import RayConfig
from components.data.oracle import RATINGS, TASKS, preference_score, rating_for_gap
from components.data.tables import SCHEMAS
from components.rlhf.sampling import SampleConfig

KINDS = ("helpful", "safety")
SAFETY_TASKS = ("harmful", "benign_lookalike")  # where a safety comparison is about refusing (tone pairs not needed)
SCHEMA = SCHEMAS["prefs_helpful"].append(pa.field("round", pa.string()))
TIE = 1e-9


@dataclass(frozen=True)
class PrefsConfig:
    """params `prefs`: how many rl_prompts each round's policy answers, and how often at each temperature."""

    prompts: int = 400  # rl_prompts rows drawn per round (seeded by the round; 0 = all)
    temperatures: tuple[float, float] = (0.7, 1.2)
    per_temperature: int = 1  # answers a prompt at each temperature (1: the paper's pair; more: a ranking)
    top_p: float = 0.9
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        if len(self.temperatures) != 2 or min(self.temperatures) < 0:
            raise ValueError(f"temperatures must be two values >= 0, got {self.temperatures}")
        if self.prompts < 0:
            raise ValueError(f"prompts must be >= 0, got {self.prompts}")
        if self.per_temperature < 1:
            raise ValueError(f"per_temperature must be >= 1, got {self.per_temperature}")

    def sampling(self, temperature: float) -> SampleConfig:
        """per_temperature answers a prompt at this temperature."""
        return SampleConfig(k=self.per_temperature, temperature=temperature, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed)


def draw_prompts(rows: list[dict], n: int, round_name: str, seed: int = 0) -> list[dict]:
    """n rl_prompts rows the oracle can label (known tasks), drawn per round: rounds ask different prompts."""
    rows = [r for r in rows if r["task"] in TASKS]
    return random.Random(f"{seed}/prefs/{round_name}").sample(rows, min(n or len(rows), len(rows)))


def kind_of(task: str) -> tuple[str, ...]:
    """The comparisons a prompt of this task yields: helpful ones on non-harmful prompts, safety ones on harmful
    prompts and their benign look-alikes (a look-alike makes both: answering it is helpful and safe)."""
    return (("helpful",) if task != "harmful" else ()) + (("safety",) if task in SAFETY_TASKS else ())


def comparisons(answers: list[str]) -> list[tuple[str, str]]:
    """Every two distinct answers to one prompt (identical draws are one answer)."""
    return list(itertools.combinations(dict.fromkeys(answers), 2))


def annotate(records: list[dict], answers: list[list[str]], round_name: str) -> dict[str, list[dict]]:
    """Every comparison of each record's answers, labelled per kind_of(task): {kind: rows} in SCHEMA's columns. The
    oracle prefers the answer with the higher preference_score; the rating is the gap's level; a tie (no preference)
    is dropped."""
    rows: dict[str, list[dict]] = {k: [] for k in KINDS}
    for record, mine in zip(records, answers, strict=True):
        reference = json.loads(record["reference"]) if isinstance(record["reference"], str) else record["reference"]
        for kind in kind_of(record["task"]):
            for a, b in comparisons(mine):
                sa, sb = (preference_score(kind, record["task"], reference, x) for x in (a, b))
                if abs(sa - sb) <= TIE:
                    continue
                chosen, rejected = (a, b) if sa > sb else (b, a)
                rows[kind].append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected,
                                   "rating": rating_for_gap(abs(sa - sb)), "task": record["task"],
                                   "reference": json.dumps(reference), "item": record["item"], "round": round_name})
    return rows


def counts(rows: dict[str, list[dict]], asked: dict[str, int], round_name: str) -> dict[str, int]:
    """This round's pairs per kind and rating level, and the ties dropped (asked - kept; asked counts comparisons of
    distinct answers, so a prompt answered the same twice is neither)."""
    out = {}
    for kind, kept in rows.items():
        mine = [r for r in kept if r["round"] == round_name]
        out[f"{kind}_pairs"] = len(mine)
        out[f"{kind}_ties"] = asked[kind] - len(mine)
        out.update({f"{kind}_{rating}": sum(r["rating"] == rating for r in mine) for rating in RATINGS})
        out[f"{kind}_pooled"] = len(kept)
    return out


def pooled(previous: pa.Table | None, new: list[dict]) -> pa.Table:
    """The previous round's (already pooled) pairs, then this round's."""
    table = pa.Table.from_pylist(new, schema=SCHEMA)
    return table if previous is None else pa.concat_tables([previous.select(SCHEMA.names).cast(SCHEMA), table])
