"""The synthetic world: a small, regular language with a ground truth, so a 1-7M parameter Llama trained for a few
CPU-minutes can learn it and every stage of the Llama 2 recipe can be *proved* by the oracle (components/data/oracle.py).

The world. `n_entities` invented creatures ("zorp", "blicket", ...), each with five attributes drawn from small
closed sets: color, home (a place), food, size and a number of legs. Everything else is templated English about
them: "The zorp is blue.", "The zorp lives in the forest.", "What color is the zorp?".

This module holds the world itself: WorldConfig (the sizes of the world and of every table) and build_world (the
entities and their facts). The rest, each importing only what comes before it:
  language.py   the vocabulary and every fixed text (prompt phrasings, topics, GAtt system prompts, segment templates)
  tasks.py      the task prompts with their answers, oracle references and items, split by item into training and
                held-out pools
  corpus.py     the pretraining documents and their planted noise
  tables.py     the rows of every table, SCHEMAS, and generate_world (all tables of the world)

Everything is a pure function of WorldConfig: one `random.Random(seed)` per part, never global random state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from components.common import config_from_dict
from components.data import language
from components.data.language import ATTRIBUTES

__all__ = ["WorldConfig", "World", "build_world"]


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world and of every table; the defaults are the tiny profile (~1.2M pretraining tokens)."""

    seed: int = 0  # the only source of randomness
    n_entities: int = 32  # invented creatures; each has 5 attributes
    n_pretrain_docs: int = 6500  # clean pretraining documents before planted noise (~1.2M tokens at vocab 2048)
    noise_rate: float = 0.2  # extra noisy documents, as a fraction of n_pretrain_docs, split equally over 6 kinds
    n_sft: int = 2000  # SFT demonstrations
    n_pref_pairs: int = 2000  # preference pairs in *each* of prefs_helpful and prefs_safety
    n_rl_prompts: int = 800  # prompts for rejection sampling and PPO
    n_gatt_dialogs: int = 400  # multi-turn dialogs with a system instruction (Ghost Attention)
    # Held-out prompts, split equally over the 6 tasks: ~100 per task, so a 0.05 difference in a task's helpfulness
    # or in the refusal rate is within reach (its 95% interval is about +-0.06 at p=0.9) at a 2-core CPU's eval cost.
    # A task whose held-out pool is smaller gets fewer: small_talk has ~14 held-out utterances x 3 forms = 42.
    n_eval_prompts: int = 600
    n_eval_gatt: int = 60  # held-out GAtt dialogs
    # User turns per eval_gatt dialog (training dialogs have 2-4). 6 turns of the tiny world, reference answers in
    # the history, take up to 235 tokens before the last answer: with evaluate's max_new_tokens 32 that is more than
    # a 256-token context: the sampler drops the oldest turns, keeping the system prompt (sampling.fit_prompt).
    eval_gatt_turns: int = 6
    eval_fraction: float = 0.2  # fraction of each family's items (facts, sums, lists, topics, small talk) held out
    multi_turn_fraction: float = 0.15  # SFT dialogs with an earlier user/assistant turn before the final one
    # single-turn fact/arithmetic SFT dialogs under a GAtt system instruction: at 0.4 the SFT model follows one in
    # 62% of first turns (0.15: 20%), so GAtt's k draws a turn find an answer that keeps it in 56% of turns (37%)
    system_prompt_fraction: float = 0.4
    max_operand: int = 20  # arithmetic operands are 0..max_operand; differences are never negative
    arithmetic_weight: float = 0.15  # weight of worked sums among pretraining segments (the others sum to 0.85)

    def __post_init__(self) -> None:
        for name in ("n_pretrain_docs", "n_sft", "n_pref_pairs", "n_rl_prompts", "n_gatt_dialogs", "n_eval_prompts",
                     "n_eval_gatt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 4 <= self.n_entities <= 200:
            raise ValueError(f"n_entities must be in [4, 200], got {self.n_entities}")
        if self.noise_rate < 0:
            raise ValueError(f"noise_rate must be >= 0, got {self.noise_rate}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("multi_turn_fraction", "system_prompt_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.eval_gatt_turns < 1:
            raise ValueError(f"eval_gatt_turns must be >= 1, got {self.eval_gatt_turns}")
        if self.arithmetic_weight < 0:
            raise ValueError(f"arithmetic_weight must be >= 0, got {self.arithmetic_weight}")
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")

    @classmethod
    def from_dict(cls, d: dict | None) -> WorldConfig:
        return config_from_dict(cls, d, "data.world")


# ---------------------------------------------------------------------------------------------------- the world
@dataclass
class World:
    entities: list[str]
    facts: dict[str, dict[str, str]]  # entity -> attribute -> value


_ONSETS = ("b", "bl", "d", "dr", "f", "fl", "g", "gl", "k", "kr", "m", "n", "p", "pl", "sn", "sp", "t", "tr", "v",
           "w", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "b", "d", "g", "k", "m", "n", "p", "rp", "sh", "x", "zz", "ck", "nt")
_RARE_CODAS = ("rp", "x", "zz", "rg", "xt")  # one-syllable names need an un-English ending ("zorp", "dax")
# English words those patterns can spell; an entity name must be an invented word.
_REAL_WORDS = frozenset({
    "burp", "derp", "tarp", "warp", "berg", "burg", "borg", "zerg", "box", "fax", "fix", "fox", "flax", "flex",
    "flux", "max", "mix", "nix", "pax", "pox", "tax", "wax", "vex", "vox", "buzz", "fizz", "fuzz", "next", "text",
    "fixt", "mixt", "bikini", "banana", "tomato", "potato", "domino", "kitten", "button", "bonnet", "magnet",
    "dragon", "wagon", "lemon", "melon", "bacon", "zenith", "panic", "tonic", "bonus", "minus", "venus", "bogus",
})


def _entity_names(rng: random.Random, n: int) -> list[str]:
    reserved, names = language.words() | _REAL_WORDS, []
    while len(names) < n:
        if rng.random() < 0.5:  # one syllable, e.g. "zorp"
            name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_RARE_CODAS)
        else:  # two syllables, e.g. "blicket"
            name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    + rng.choice(("k", "t", "n", "b", "l", "r", "x")) + rng.choice(_VOWELS) + rng.choice(_CODAS[1:]))
        if len(name) <= 8 and name not in reserved and name not in names:
            names.append(name)
    return names


def build_world(cfg: WorldConfig) -> World:
    """The entities and their facts (deterministic from cfg.seed)."""
    rng = random.Random(f"{cfg.seed}/entities")
    entities = _entity_names(rng, cfg.n_entities)
    facts = {e: {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()} for e in entities}
    return World(entities, facts)

