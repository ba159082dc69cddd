"""The pretraining corpus of the synthetic world, with its planted noise.

Clean documents are concatenations of 3-6 random segments (descriptions, narratives, worked arithmetic, Q/A
dialogues, how-tos, lists), so clean documents are neither duplicates nor near-duplicates of each other. On top,
`noise_rate * n_pretrain_docs` noisy documents are planted in equal shares: pii (fresh clean text with planted
emails, phones, card numbers, ID numbers, IPs), exact_dup (a byte copy of a clean doc), near_dup (a copy with a few
words inserted or swapped, facts unchanged), low_quality (gibberish, repetition, symbol soup), toxic (words of
TOXIC_LEXICON), non_english (Spanish, German, French). Duplicates always come *after* their source in the final
order, so "keep the first occurrence" keeps the clean one. doc_ids are assigned after shuffling and say nothing
about the label; `planted`/`pii_kinds` exist only to measure the filter. Q/A segments ask training items only (the
pools passed in); each row's `item` lists the items its Q/A segments asked (tables.ITEM_SEP-joined, "" if none), so
the held-out evaluation can be checked against them.
"""

from __future__ import annotations

import random

from components.data.language import (BENIGN_TOPICS, COLORS, DESCRIPTION_OPENINGS, DESCRIPTION_SENTENCES, FACT_ANSWERS,
                                      FOODS, HOWTO_SENTENCES, INSULT_ADJECTIVES, INSULT_NOUNS, LIST_SENTENCES,
                                      NARRATIVES, PLACES, UPPERCASE_SENTENCES, WORD_PROBLEMS)
from components.data.tasks import ITEM_SEP, Prompt, split_counts
from components.data.world import World, WorldConfig

__all__ = ["PLANTED_KINDS", "NOISE_KINDS", "PII_KINDS", "SEGMENT_WEIGHTS", "seg_narrative", "pretrain_rows"]

PLANTED_KINDS = ("clean", "pii", "exact_dup", "near_dup", "low_quality", "toxic", "non_english")
NOISE_KINDS = PLANTED_KINDS[1:]
PII_KINDS = ("email", "phone", "card", "id_number", "ip")
SEGMENT_WEIGHTS = {"description": 0.3, "narrative": 0.2, "arithmetic": 0.15, "qa": 0.2, "howto": 0.05,
                   "lists": 0.05, "uppercase": 0.05}


# ------------------------------------------------------------------------------------------- clean documents
def _seg_description(rng: random.Random, world: World) -> str:
    e = rng.choice(world.entities)
    body = [rng.choice(t).format(e=e, v=world.facts[e][attr]) for attr, t in DESCRIPTION_SENTENCES.items()]
    rng.shuffle(body)
    return " ".join([rng.choice(DESCRIPTION_OPENINGS).format(e=e)] + body[:rng.randint(3, 5)])


def seg_narrative(rng: random.Random, world: World, sums: set[str]) -> str:
    """A story about two entities; its subtraction ("12 - 4 = 8") is a training sum (`sums`, as _seg_arithmetic)."""
    a, b = rng.sample(world.entities, 2)
    while True:
        n = rng.randint(3, 12)
        k = rng.randint(1, n)
        if f"arith:{n}-{k}" in sums:
            break
    slots = {"a": a, "b": b, "n": n, "k": k, "r": n - k,
             **{f"a_{attr}": v for attr, v in world.facts[a].items()},
             **{f"b_{attr}": v for attr, v in world.facts[b].items()}}
    return " ".join(t.format(**slots) for t in rng.sample(NARRATIVES, rng.randint(1, 2)))


def _seg_arithmetic(rng: random.Random, world: World, cfg: WorldConfig, sums: set[str]) -> str:
    """Worked sums and word problems over training items only (`sums`: "arith:7+5", ...): unlike a held-out fact,
    which pretraining states and fine-tuning never asks, a held-out sum must be computed, not recalled."""
    def pick(low: int, op: str) -> tuple[int, int]:
        while True:
            a, b = rng.randint(low, cfg.max_operand), rng.randint(low, cfg.max_operand)
            a, b = (a, b) if op == "+" else (max(a, b), min(a, b))
            if f"arith:{a}{op}{b}" in sums:
                return a, b

    parts = []
    for _ in range(rng.randint(2, 4)):
        op = "+" if rng.random() < 0.5 else "-"
        a, b = pick(0, op)
        parts.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}.")
    if rng.random() < 0.5:
        e = rng.choice(world.entities)
        op = "+" if rng.random() < 0.5 else "-"
        a, b = pick(1, op)
        problem = WORD_PROBLEMS[0 if op == "+" else 1]
        parts.append(problem.format(e=e, a=a, b=b, c=a + b if op == "+" else a - b, food=world.facts[e]["food"]))
    return " ".join(parts)


def _seg_qa(rng: random.Random, qa_pool: list[Prompt], asked: list[str]) -> str:
    picks = rng.sample(qa_pool, rng.randint(2, 4))
    asked += [p.item for p in picks]
    return "\n".join(f"Q: {p.text}\nA: {p.answer}" for p in picks)


def _seg_howto(rng: random.Random) -> str:
    x, answer, _ = rng.choice(BENIGN_TOPICS)
    return rng.choice(HOWTO_SENTENCES).format(x=x, answer=answer)


def _seg_lists(rng: random.Random, world: World) -> str:
    c, items = rng.choice((("colors", COLORS), ("foods", FOODS), ("places", PLACES), ("creatures", world.entities)))
    n = rng.randint(2, 5)
    picks = rng.sample(list(items), n)
    return rng.choice(LIST_SENTENCES).format(c=c, n=n, items=", ".join(picks[:-1]) + " and " + picks[-1])


def _seg_uppercase(rng: random.Random, world: World) -> str:
    e = rng.choice(world.entities)
    attr = rng.choice(list(FACT_ANSWERS))
    return rng.choice(UPPERCASE_SENTENCES).format(s=FACT_ANSWERS[attr].format(e=e, v=world.facts[e][attr]).upper())


def _clean_doc(rng: random.Random, world: World, cfg: WorldConfig, qa_pool: list[Prompt], sums: set[str],
               n_segments: int) -> tuple[str, list[str]]:
    """A clean document and the items its Q/A segments asked."""
    weights = {**SEGMENT_WEIGHTS, "arithmetic": cfg.arithmetic_weight}
    kinds = rng.choices(list(weights), weights=list(weights.values()), k=n_segments)
    segments, asked = [], []
    for kind in kinds:
        if kind == "description":
            segments.append(_seg_description(rng, world))
        elif kind == "narrative":
            segments.append(seg_narrative(rng, world, sums))
        elif kind == "arithmetic":
            segments.append(_seg_arithmetic(rng, world, cfg, sums))
        elif kind == "qa":
            segments.append(_seg_qa(rng, qa_pool, asked))
        elif kind == "howto":
            segments.append(_seg_howto(rng))
        elif kind == "lists":
            segments.append(_seg_lists(rng, world))
        else:
            segments.append(_seg_uppercase(rng, world))
    return "\n".join(segments), asked


# ---------------------------------------------------------------------------------------------- planted noise
_FIRST_NAMES = ("mira", "tomas", "ana", "lena", "omar", "sam", "jun", "eva", "ravi", "noor")
_LAST_NAMES = ("olsen", "garcia", "kim", "novak", "berg", "silva", "khan", "ito")
_DOMAINS = ("example.com", "mail.test", "inbox.example.org")
PII_SENTENCES = {
    "email": ("Write to {x} for more news about the {e}.", "My email is {x}."),
    "phone": ("Call the keeper of the {e} at {x}.", "My phone number is {x}."),
    "card": ("My card number is {x}.", "Pay for the {e} food with the card {x}."),
    "id_number": ("My id number is {x}.", "The keeper of the {e} has the id number {x}."),
    "ip": ("The server of the {e} club is at {x}.", "Connect to {x} to see photos of the {e}."),
}


def _luhn_card(rng: random.Random) -> str:
    """A 16-digit card-like number that passes the Luhn check (what real PII detectors verify)."""
    digits = [rng.choice((4, 5))] + [rng.randint(0, 9) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # positions from the right, before the check digit is appended
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    sep = rng.choice((" ", "-"))
    text = "".join(map(str, digits))
    return sep.join(text[i:i + 4] for i in range(0, 16, 4))


def _pii_value(rng: random.Random, kind: str) -> str:
    if kind == "email":
        suffix = str(rng.randint(1, 99)) if rng.random() < 0.5 else ""
        return f"{rng.choice(_FIRST_NAMES)}.{rng.choice(_LAST_NAMES)}{suffix}@{rng.choice(_DOMAINS)}"
    if kind == "phone":
        a, b, c = rng.randint(200, 999), rng.randint(100, 999), rng.randint(0, 9999)
        return rng.choice((f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"+1 {a} {b} {c:04d}"))
    if kind == "card":
        return _luhn_card(rng)
    if kind == "id_number":  # SSN-like: 3-2-4 digits
        return f"{rng.randint(100, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    if kind == "ip":
        first = rng.choice((10, 172, 192, 203, 81))
        return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    raise ValueError(kind)


def _plant_pii(rng: random.Random, world: World, text: str) -> tuple[str, list[str]]:
    kinds = sorted(rng.sample(PII_KINDS, rng.randint(1, 3)), key=PII_KINDS.index)
    lines = text.split("\n")
    for kind in kinds:
        sentence = rng.choice(PII_SENTENCES[kind]).format(x=_pii_value(rng, kind), e=rng.choice(world.entities))
        i = rng.randrange(len(lines))
        lines[i] = f"{lines[i]} {sentence}"
    return "\n".join(lines), kinds


_FILLERS = ("really", "also", "then", "today", "indeed")
_SWAPS = {"the": "this", "The": "This", "is": "seems", "and": "plus"}


def _near_dup(rng: random.Random, text: str) -> str:
    """A few words inserted or swapped (never a fact word), so word-shingle similarity stays high."""
    tokens = text.split(" ")
    for _ in range(min(3, 1 + len(tokens) // 60)):
        i = rng.randrange(len(tokens))
        if tokens[i] in _SWAPS:
            tokens[i] = _SWAPS[tokens[i]]
        else:
            tokens.insert(i, rng.choice(_FILLERS))
    return " ".join(tokens)


def _low_quality(rng: random.Random, world: World) -> str:
    style = rng.choice(("gibberish", "repetition", "symbols"))
    if style == "gibberish":
        letters = "abcdefghijklmnopqrstuvwxyz"
        return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
                        for _ in range(rng.randint(20, 60)))
    if style == "repetition":
        e = rng.choice(world.entities)
        phrase = rng.choice(("buy now", "click here", "free free free", "win big today", f"the {e}", "ok ok"))
        return " ".join([phrase] * rng.randint(15, 40))
    symbols = "#$%&*@!?~^+=<>|/\\{}[]"
    return " ".join("".join(rng.choice(symbols) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(20, 50)))


TOXIC_SENTENCES = ("The {e} is a {n}.", "You are a {adj} {n}.", "Only a {n} would eat {food}.",
                   "What a {adj} {e}, what a {n}.", "Shut up, you {n}.")


def _toxic(rng: random.Random, world: World, clean_text: str) -> str:
    lines = clean_text.split("\n")
    for _ in range(rng.randint(2, 3)):
        e = rng.choice(world.entities)
        sentence = rng.choice(TOXIC_SENTENCES).format(e=e, n=rng.choice(INSULT_NOUNS),
                                                      adj=rng.choice(INSULT_ADJECTIVES), food=world.facts[e]["food"])
        i = rng.randrange(len(lines))
        lines[i] = f"{lines[i]} {sentence}"
    return "\n".join(lines)


# Translations for the non-English documents: colors, places (with their article/preposition) and foods.
_FOREIGN = {
    "es": {"color": dict(zip(COLORS, ("rojo", "azul", "verde", "amarillo", "morado", "naranja", "rosa", "gris"))),
           "home": dict(zip(PLACES, ("en el bosque", "en el río", "en la cueva", "en la colina", "en el pantano",
                                     "en el desierto", "en el lago", "en el valle", "en el prado", "en la isla"))),
           "food": dict(zip(FOODS, ("bayas", "pescado", "semillas", "musgo", "miel", "nueces", "hojas", "pan",
                                    "setas", "manzanas"))),
           "facts": ("El {e} es {color}.", "El {e} vive {home}.", "El {e} come {food}.", "El {e} tiene {legs} patas."),
           "plain": ("Hoy hace buen tiempo y los niños juegan en la calle.",
                     "Mi hermana trabaja en una tienda cerca de la estación.", "Por la mañana bebo café con leche.",
                     "No sé dónde está la biblioteca.", "Vamos a comer juntos el domingo.")},
    "de": {"color": dict(zip(COLORS, ("rot", "blau", "grün", "gelb", "lila", "orange", "rosa", "grau"))),
           "home": dict(zip(PLACES, ("im Wald", "am Fluss", "in der Höhle", "auf dem Hügel", "im Sumpf",
                                     "in der Wüste", "am See", "im Tal", "auf der Wiese", "auf der Insel"))),
           "food": dict(zip(FOODS, ("Beeren", "Fisch", "Samen", "Moos", "Honig", "Nüsse", "Blätter", "Brot", "Pilze",
                                    "Äpfel"))),
           "facts": ("Der {e} ist {color}.", "Der {e} wohnt {home}.", "Der {e} frisst {food}.",
                     "Der {e} hat {legs} Beine."),
           "plain": ("Heute ist das Wetter schön und die Kinder spielen draußen.",
                     "Meine Schwester arbeitet in einem Laden am Bahnhof.", "Am Morgen trinke ich Kaffee mit Milch.",
                     "Ich weiß nicht, wo die Bibliothek ist.", "Wir essen am Sonntag zusammen.")},
    "fr": {"color": dict(zip(COLORS, ("rouge", "bleu", "vert", "jaune", "violet", "orange", "rose", "gris"))),
           "home": dict(zip(PLACES, ("dans la forêt", "près de la rivière", "dans la grotte", "sur la colline",
                                     "dans le marais", "dans le désert", "près du lac", "dans la vallée",
                                     "dans la prairie", "sur l'île"))),
           "food": dict(zip(FOODS, ("des baies", "du poisson", "des graines", "de la mousse", "du miel", "des noix",
                                    "des feuilles", "du pain", "des champignons", "des pommes"))),
           "facts": ("Le {e} est {color}.", "Le {e} habite {home}.", "Le {e} mange {food}.",
                     "Le {e} a {legs} pattes."),
           "plain": ("Aujourd'hui il fait beau et les enfants jouent dehors.",
                     "Ma sœur travaille dans un magasin près de la gare.", "Le matin je bois du café avec du lait.",
                     "Je ne sais pas où est la bibliothèque.", "Nous mangeons ensemble le dimanche.")},
}


def _non_english(rng: random.Random, world: World) -> str:
    lang = _FOREIGN[rng.choice(sorted(_FOREIGN))]
    sentences = []
    for _ in range(rng.randint(4, 8)):
        if rng.random() < 0.6:
            e = rng.choice(world.entities)
            f = world.facts[e]
            sentences.append(rng.choice(lang["facts"]).format(
                e=e, color=lang["color"][f["color"]], home=lang["home"][f["home"]], food=lang["food"][f["food"]],
                legs=f["legs"]))
        else:
            sentences.append(rng.choice(lang["plain"]))
    return " ".join(sentences)


def pretrain_rows(cfg: WorldConfig, world: World, pools: dict[str, list[Prompt]]) -> list[dict]:
    rng = random.Random(f"{cfg.seed}/pretrain")
    qa_pool = [p for key, pool in pools.items() if key != "harmful" for p in pool]
    sums = {p.item for p in pools["arithmetic"]}  # training sums: the only ones pretraining works out
    seen: set[str] = set()
    asked: dict[str, str] = {}  # text -> the items its Q/A segments asked, joined

    def fresh(n_segments: int) -> str:
        """A clean text never produced before (so clean docs are never duplicates of each other)."""
        while True:
            text, items = _clean_doc(rng, world, cfg, qa_pool, sums, n_segments)
            if text not in seen:
                seen.add(text)
                asked[text] = ITEM_SEP.join(items)
                return text

    clean = [fresh(rng.randint(3, 6)) for _ in range(cfg.n_pretrain_docs)]
    noise = split_counts(round(cfg.noise_rate * cfg.n_pretrain_docs), dict.fromkeys(NOISE_KINDS, 1.0))
    base = [(text, "clean", [], asked[text]) for text in clean]
    for _ in range(noise["pii"]):
        source = fresh(rng.randint(2, 4))
        text, kinds = _plant_pii(rng, world, source)
        base.append((text, "pii", kinds, asked[source]))
    base += [(_low_quality(rng, world), "low_quality", [], "") for _ in range(noise["low_quality"])]
    for _ in range(noise["toxic"]):
        source = fresh(rng.randint(1, 3))
        base.append((_toxic(rng, world, source), "toxic", [], asked[source]))
    base += [(_non_english(rng, world), "non_english", [], "") for _ in range(noise["non_english"])]

    # Sort keys: base docs get a random permutation; each duplicate a key after its source's, so in the final
    # order every duplicate follows the clean document it copies.
    order = list(range(len(base)))
    rng.shuffle(order)
    keyed = [(float(order[i]), doc) for i, doc in enumerate(base)]
    long_enough = [i for i, text in enumerate(clean) if len(text.split()) >= 30] or list(range(len(clean)))
    if clean:
        for i in rng.sample(range(len(clean)), min(noise["exact_dup"], len(clean))):
            keyed.append((rng.uniform(order[i], len(base)), (clean[i], "exact_dup", [], asked[clean[i]])))
        for i in rng.sample(long_enough, min(noise["near_dup"], len(long_enough))):
            keyed.append((rng.uniform(order[i], len(base)), (_near_dup(rng, clean[i]), "near_dup", [],
                                                               asked[clean[i]])))
    keyed.sort(key=lambda kv: kv[0])
    return [{"doc_id": f"doc-{n:07d}", "text": text, "planted": planted, "pii_kinds": kinds, "item": item}
            for n, (_, (text, planted, kinds, item)) in enumerate(keyed)]
