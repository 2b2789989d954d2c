"""Synthetic reading-comprehension conversations: the skill of answering from passages, taught
on fictional worlds that share nothing with any real knowledge base.

A world is a few made-up entities ("the Vornak ferry", "the TEL-40 scanner"), each with facts
of the form "The {attribute} of the {entity} is {value}." Passages (short, like the sentence-
window chunks a store returns) state some of them; distractors share an attribute or an
entity with the right fact, so only reading the whole phrase finds it. The user asks about a
fact in several phrasings; the assistant answers with the value copied from the passage and
cites it as [n]. Asked about something no passage states, or with no passages at all, the
assistant says "I don't know." Values are drawn independently of the attribute, so copying is
the only way to be right: the model learns to read, not what things are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DONT_KNOW = "I don't know."

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
           "sh", "st", "t", "tr", "v", "w", "z", "th", "qu"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ar", "er", "or", "an", "en", "in", "on", "al", "el", "il"]
_CODAS = ["", "", "", "n", "r", "l", "s", "t", "m", "k"]
_COLORS = ["red", "blue", "green", "amber", "violet", "grey", "white", "black", "teal", "orange", "silver", "gold"]
_MATERIALS = ["oak", "steel", "granite", "copper", "glass", "bamboo", "brick", "marble", "cedar", "aluminium", "slate"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_COUNT_UNITS = ["days", "weeks", "months", "years", "hours", "minutes", "seconds", "kg", "m", "cm", "km", "people",
                "seats", "rooms", "floors", "pages", "stations", "members", "beds", "lanes", "items", "robots", "sites",
                "business days", "operating hours", "requests per minute", "charge cycles", "A", "V", "W"]
_DECIMAL_UNITS = ["m", "kg", "kWh", "km", "liters", "tonnes", "m/s", "hours", "GB", "MW", "kW", "V"]
_SECTIONS = ["Overview", "Details", "Facts", "Specifications", "Policy", "Notes", "History", "Pricing", "Service",
             "Limits", "Support", "Eligibility"]
# Kinds of fictional things and the attributes their facts name.
_DOMAINS = {
    "ship": (["ship", "ferry", "barge", "schooner"], ["home port", "launch year", "crew size", "top speed", "captain",
                                                       "hull color", "length", "cargo limit", "ticket price"]),
    "castle": (["castle", "fortress", "keep", "manor"], ["founding year", "owner", "wall height", "entry fee",
                                                          "number of rooms", "opening time", "moat depth"]),
    "festival": (["festival", "fair", "carnival", "market"], ["opening date", "ticket price", "attendance",
                                                              "host town", "organizer", "duration", "stage count"]),
    "kitchen": (["bakery", "cafe", "diner", "canteen"], ["head chef", "opening time", "closing time", "seating capacity",
                                                          "owner", "delivery fee", "signature dish"]),
    "planet": (["planet", "moon", "comet", "colony"], ["orbital period", "surface temperature", "discoverer",
                                                        "discovery year", "radius", "gravity", "population"]),
    "device": (["scanner", "drone", "printer", "router", "sensor", "charger", "pump", "turbine", "loom", "robot"],
               ["battery capacity", "warranty period", "weight", "list price", "top speed", "model code",
                "operating range", "charging time", "service interval", "return window", "restocking fee"]),
    "policy": (["policy", "program", "plan", "agreement", "license", "subscription"],
               ["renewal period", "annual fee", "approval limit", "notice period", "review cycle", "owner",
                "start date", "grace period", "discount", "late fee", "monthly price"]),
    "guild": (["guild", "club", "league", "society", "team"], ["founder", "membership fee", "member count",
                                                                "meeting day", "headquarters", "chairperson"]),
    "river": (["river", "lake", "canal", "glacier"], ["length", "source", "depth", "water temperature", "mouth"]),
    "transit": (["train", "tram", "bus line", "cable car"], ["first departure", "last departure", "fare",
                                                             "line color", "terminus", "route length", "operator"]),
    "course": (["course", "workshop", "seminar", "exam"], ["duration", "instructor", "course fee", "passing score",
                                                           "start date", "room", "seat limit"]),
    "software": (["app", "service", "portal", "console", "library"], ["release date", "license fee", "rate limit",
                                                                      "session timeout", "latest version",
                                                                      "retention period", "uptime target"]),
    "building": (["hotel", "hospital", "school", "warehouse", "museum"], ["capacity", "architect", "opening year",
                                                                         "floor count", "address", "director",
                                                                         "parking fee"]),
}
_CONNECTORS = ["of the", "of the", "of the", "for the", "for a", "of a", "on the", "of an", "of", "for"]
_QUESTIONS = [
    "What is the {subject}?", "What's the {subject}?", "Tell me the {subject}.", "Do you know the {subject}?",
    "Can you tell me the {subject}?", "I need the {subject}.", "Please give the {subject}.", "{Subject}?",
    "What was the {subject} again?",
]


_FILLERS = ["{entity} is reviewed every year by an independent team.", "Questions about {entity} go to the front office.",
            "Records for {entity} are kept in the archive.", "Changes to {entity} are announced in advance.",
            "Staff keep a logbook for {entity}.", "Details of {entity} may change without notice."]


@dataclass(frozen=True)
class Level:
    """How hard the conversations of one curriculum stage are."""

    facts: tuple[float, ...]  # chance of 1, 2, 3 ... facts in a passage
    extra_passages: float  # chance of one or two more passages (another entity's facts)
    questions: int  # most questions per conversation
    dont_know: float  # chance of a question no passage answers


# A model first learns to copy (one fact), then to pick the right fact of a passage. Passages
# are sentence windows: one to three sentences, mostly one retrieved passage per question.
CURRICULUM = (
    (0.3, Level(facts=(1.0,), extra_passages=0.0, questions=3, dont_know=0.05)),
    (1.0, Level(facts=(0.6, 0.3, 0.1), extra_passages=0.1, questions=4, dont_know=0.12)),
)


def level_at(progress: float) -> Level:
    return next((level for until, level in CURRICULUM if progress < until), CURRICULUM[-1][1])


def subject_question(subject: str, rng: random.Random) -> str:
    template = rng.choice(_QUESTIONS)
    return template.format(subject=subject, Subject=subject[0].upper() + subject[1:])


def conversation(rng: random.Random, level: Level) -> tuple[list[str] | None, list[tuple[str, str]]]:
    """(passages, or None for a closed-book conversation; [(question, answer), ...])."""
    kinds, attributes = _DOMAINS[rng.choice(list(_DOMAINS))]
    entity = _entity(rng, kinds)
    count = rng.choices(range(1, len(level.facts) + 1), weights=level.facts)[0]
    facts = [_fact(rng, entity, attribute) for attribute in rng.sample(attributes, count)]
    if count > 1 and rng.random() < 0.3:  # a second thing in the same window, sharing an attribute
        facts[-1] = _fact(rng, _entity(rng, kinds), facts[-1].attribute)
    if rng.random() < level.dont_know / 2:  # closed book: nothing to read, nothing to invent
        return None, [(subject_question(f.subject, rng), DONT_KNOW) for f in facts[:2]]
    sentences = [f.statement for f in facts]
    if rng.random() < 0.5:  # prose around the facts, as real chunks have
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(_FILLERS).format(entity=f"the {entity}"))
    passages = [_passage(entity, sentences, rng)]
    where = {f.subject: 1 for f in facts}
    if rng.random() < level.extra_passages:
        for _ in range(rng.randint(1, 2)):
            other = _fact(rng, _entity(rng, kinds), rng.choice(attributes))
            at = rng.randint(0, len(passages))
            passages.insert(at, _passage(other.entity, [other.statement], rng))
            where = {subject: n + (n > at) for subject, n in where.items()}
            where[other.subject] = at + 1
    qa = [(subject_question(f.subject, rng), f"{f.value} [{where[f.subject]}]")
          for f in rng.sample(facts, len(facts))][:level.questions]
    if rng.random() < level.dont_know:  # asked about something the passages do not state
        missing = _fact(rng, entity, rng.choice([a for a in attributes if a not in {f.attribute for f in facts}]))
        qa.insert(rng.randint(0, len(qa)), (subject_question(missing.subject, rng), DONT_KNOW))
    return passages, qa


def _passage(entity: str, sentences: list[str], rng: random.Random) -> str:
    """A chunk as a store returns it: the section path, then the text."""
    return f"{entity[0].upper()}{entity[1:]} > {rng.choice(_SECTIONS)}\n" + " ".join(sentences)


def _entity(rng: random.Random, kinds: list[str]) -> str:
    return f"{_name(rng)} {rng.choice(kinds)}"


def _fact(rng: random.Random, entity: str, attribute: str) -> "_Fact":
    return _Fact(entity, attribute, f"{attribute} {rng.choice(_CONNECTORS)} {entity}", _value(rng))


@dataclass(frozen=True)
class _Fact:
    entity: str
    attribute: str
    subject: str  # "{attribute} {connector} {entity}"
    value: str

    @property
    def statement(self) -> str:
        return f"The {self.subject} is {self.value}."


def _word(rng: random.Random, syllables: tuple[int, int] = (1, 3)) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                   for _ in range(rng.randint(*syllables)))
    return word.capitalize()


def _name(rng: random.Random) -> str:
    return rng.choice([_word(rng), _word(rng), f"{_word(rng)}-{rng.randint(2, 900)}", f"{_word(rng, (1, 2))} "
                       f"{_word(rng, (1, 2))}", f"{_word(rng, (1, 1)).upper()}-{rng.randint(2, 99)}"])


def _value(rng: random.Random) -> str:
    kind = rng.randrange(13)
    if kind < 3:
        return f"{rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(2, 30)])} {rng.choice(_COUNT_UNITS)}"
    if kind == 3:
        return f"{rng.randint(0, 99)}.{rng.randint(1, 9)} {rng.choice(_DECIMAL_UNITS)}"
    if kind == 4:
        amount = f"${rng.choice([rng.randint(5, 999), rng.randint(1000, 99999)]):,}"
        return amount + rng.choice(["", "", " per month", " per year", " per person", " per site", " per seat",
                                    " per night", " per day", " per mile"])
    if kind == 5:
        return rng.choice([f"{rng.randint(1, 95)}%", f"{rng.randint(1, 40)}.{rng.randint(1, 9)}%"])
    if kind == 6:
        return rng.choice([str(rng.randint(1700, 2030)), f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} "
                           f"{rng.randint(1950, 2030)}", f"{rng.choice(_MONTHS)} {rng.randint(1950, 2030)}"])
    if kind == 7:
        return f"{rng.randint(5, 22)}:{rng.choice(['00', '15', '30', '45'])}"
    if kind == 8:
        return f"{_word(rng, (1, 2))} {_word(rng, (2, 3))}"
    if kind == 9:
        return rng.choice([f"{_word(rng)}, {_word(rng)}", _word(rng),
                           f"{_word(rng)} {rng.choice(['Bay', 'Hill', 'Port', 'Valley', 'Square'])}"])
    if kind == 10:
        return rng.choice(_COLORS + _MATERIALS)
    if kind == 11:
        prefix = "".join(rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(rng.randint(1, 3)))
        return f"{prefix}-{rng.randint(1, 99999)}"
    low = rng.randint(0, 60)
    return f"{low} to {low + rng.randint(5, 40)} {rng.choice(['°C', 'percent', 'kg', 'minutes', 'years'])}"
