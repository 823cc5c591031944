"""The embedded fact world: fictional entities, their attributes, documents and probes.

A seeded generator builds `num_entities` people with five attributes (birth city, birth
year, profession, employer, mentor = another person). Each fact is rendered through
several paraphrase templates into short biographies, plus question/answer documents
phrased exactly like the probes ("Q: Where was <name> born? A: <city>"), so that a
model which memorised a fact can answer the probe by continuing the question.

A fraction of the entities (`new_fact_fraction`) is held out: their documents are not
in the training corpus (they are written to `new_facts.jsonl` for finetuning studies)
and their probes carry `is_new_fact=True`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.files import atomic_write

CITIES = [
    "Aldmere",
    "Brightwater",
    "Carrowick",
    "Dunmore",
    "Eastvale",
    "Fairhaven",
    "Glenbrook",
    "Highcliff",
    "Ironwood",
    "Kingsport",
    "Lakeshire",
    "Millbrook",
    "Northgate",
    "Oakridge",
    "Pinecrest",
    "Queensbury",
    "Riverton",
    "Stonebridge",
    "Thornbury",
    "Westfield",
]
PROFESSIONS = [
    "baker",
    "chemist",
    "pilot",
    "architect",
    "carpenter",
    "librarian",
    "surgeon",
    "painter",
    "geologist",
    "sailor",
    "teacher",
    "engineer",
    "poet",
    "farmer",
    "judge",
    "astronomer",
]
EMPLOYERS = [
    "Northwind Labs",
    "Blue Harbor",
    "Silverline",
    "Redstone Works",
    "Golden Mill",
    "Cedar Systems",
    "Falcon Press",
    "Granite Bank",
    "Harbor Foods",
    "Lumen Optics",
    "Maple Freight",
    "Orchid Studio",
]
YEARS = [str(y) for y in range(1930, 1990)]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "m"]

QUESTIONS = {
    "city": "Q: Where was {name} born? A:",
    "year": "Q: In what year was {name} born? A:",
    "profession": "Q: What is the profession of {name}? A:",
    "employer": "Q: Which company does {name} work for? A:",
    "mentor": "Q: Who was the mentor of {name}? A:",
}
TEMPLATES = {
    "city": [
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} grew up in {value}, the city of their birth.",
        "Records show that {name} was born in the city of {value}.",
    ],
    "year": [
        "{name} was born in the year {value}.",
        "The birth year of {name} is {value}.",
        "{name} came into the world in {value}.",
        "Born in {value}, {name} grew up quickly.",
    ],
    "profession": [
        "{name} works as a {value}.",
        "By profession, {name} is a {value}.",
        "The profession of {name} is {value}.",
        "{name} earns a living as a {value}.",
    ],
    "employer": [
        "{name} works for {value}.",
        "The employer of {name} is {value}.",
        "{name} is employed by {value}.",
        "Every morning {name} goes to work at {value}.",
    ],
    "mentor": [
        "The mentor of {name} was {value}.",
        "{name} was mentored by {value}.",
        "{name} learned the trade from {value}, their mentor.",
        "{value} was the mentor of {name}.",
    ],
}
ATTRIBUTES = list(QUESTIONS)


@dataclass(frozen=True)
class Probe:
    """One fact question; the model should continue `question` with `answer` (greedy)."""

    question: str
    answer: str
    attribute: str
    chance: float  # accuracy of a uniform guess among the attribute's distinct values
    is_new_fact: bool


@dataclass(frozen=True)
class Entity:
    name: str
    city: str
    year: str
    profession: str
    employer: str
    mentor: str
    is_new_fact: bool


@dataclass
class FactWorld:
    entities: list[Entity]
    train_documents: list[str]  # shuffled; the training corpus
    new_fact_documents: list[str]  # documents of held-out entities, not in the corpus
    probes: list[Probe]


def _make_name(rng: random.Random) -> str:
    def word(min_syl: int, max_syl: int) -> str:
        syl = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(min_syl, max_syl))]
        return ("".join(syl) + rng.choice(_CODAS)).capitalize()

    return f"{word(1, 2)} {word(2, 3)}"


def check_world_settings(
    num_entities: int, docs_per_entity: int, qa_docs_per_entity: int, new_fact_fraction: float
) -> None:
    """Refuse, naming the data.synthetic key, settings that build no world (the config checks call it too)."""
    if num_entities < 2:
        raise DataError(f"data.synthetic.num_entities={num_entities} must be >= 2 (e.g. 300 for the demo)")
    if docs_per_entity < 0 or qa_docs_per_entity < 0 or docs_per_entity + qa_docs_per_entity == 0:
        raise DataError(
            f"data.synthetic.docs_per_entity={docs_per_entity} and qa_docs_per_entity={qa_docs_per_entity} "
            "must be >= 0 with a positive sum"
        )
    if not 0.0 <= new_fact_fraction < 1.0:
        raise DataError(f"data.synthetic.new_fact_fraction={new_fact_fraction} must be in [0, 1)")


def build_fact_world(
    num_entities: int,
    docs_per_entity: int = 4,
    qa_docs_per_entity: int = 2,
    new_fact_fraction: float = 0.1,
    seed: int = 1234,
) -> FactWorld:
    """Generate the world deterministically from `seed` (same arguments -> same output)."""
    check_world_settings(num_entities, docs_per_entity, qa_docs_per_entity, new_fact_fraction)
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_entities:
        name = _make_name(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    n_new = int(round(num_entities * new_fact_fraction))
    n_train = num_entities - n_new
    entities = []
    for i, name in enumerate(names):
        mentor = names[rng.randrange(n_train - 1)] if n_train > 1 else names[0]
        if mentor == name:  # nobody mentors themselves
            mentor = names[n_train - 1]
        entities.append(
            Entity(
                name=name,
                city=rng.choice(CITIES),
                year=rng.choice(YEARS),
                profession=rng.choice(PROFESSIONS),
                employer=rng.choice(EMPLOYERS),
                mentor=mentor,
                is_new_fact=i >= n_train,
            )
        )

    train_docs, new_docs = [], []
    for ent in entities:
        docs = []
        for _ in range(docs_per_entity):
            order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
            docs.append(" ".join(rng.choice(TEMPLATES[a]).format(name=ent.name, value=getattr(ent, a)) for a in order))
        for _ in range(qa_docs_per_entity):
            order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
            # No punctuation after an answer, so its tokens match tokenizing the answer alone.
            docs.append(" ".join(QUESTIONS[a].format(name=ent.name) + " " + getattr(ent, a) for a in order))
        (new_docs if ent.is_new_fact else train_docs).extend(docs)
    rng.shuffle(train_docs)

    distinct = {a: len({getattr(e, a) for e in entities}) for a in ATTRIBUTES}
    probes = [
        Probe(QUESTIONS[a].format(name=e.name), getattr(e, a), a, 1.0 / distinct[a], e.is_new_fact)
        for e in entities
        for a in ATTRIBUTES
    ]
    rng.shuffle(probes)
    return FactWorld(entities, train_docs, new_docs, probes)


def write_probes(probes: list[Probe], path: Path) -> None:
    atomic_write(path, "".join(json.dumps(asdict(p), sort_keys=True) + "\n" for p in probes))


def load_probes(dataset_dir: str | Path) -> list[Probe]:
    """The fact probes of a prepared embedded dataset (`probes.jsonl` in its directory)."""
    path = Path(dataset_dir) / "probes.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: probes come with the embedded corpus "
            "(prepare it with pretrain.data.prepare_embedded_dataset or leave data.dir empty)"
        )
    probes = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            probes.append(Probe(**json.loads(line)))
        except (ValueError, TypeError) as err:
            raise DataError(f"{path}:{lineno}: not a probe record ({err}); re-create the dataset") from None
    return probes
