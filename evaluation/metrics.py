"""Answer-quality metrics that need no judge model: exact match and token F1 against a
reference (SQuAD normalisation), citation correctness, abstention, and paired bootstrap
confidence intervals for the difference between two modes on the same questions.

A reply's citation markers ([1], [2] ...) refer to the passages the response lists under
`citations`, in order. The markers are not part of the answer: they are stripped before the
answer is compared with the reference.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

_MARKER = re.compile(r"\[(\d+)\]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# Replies that decline: the local model's trained "I don't know." and the gateway's abstention.
_DECLINES = ("i dont know", "i do not know", "i could not find")


def answer_text(reply: str) -> str:
    """The reply without its citation markers."""
    return " ".join(_MARKER.sub(" ", reply).split())


def normalize(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reply: str, reference: str) -> float:
    return float(normalize(answer_text(reply)) == normalize(reference))


def token_f1(reply: str, reference: str) -> float:
    predicted, gold = normalize(answer_text(reply)).split(), normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def cited_indices(reply: str) -> list[int]:
    """The passage numbers a reply cites, in order of first mention."""
    seen: list[int] = []
    for match in _MARKER.finditer(reply):
        n = int(match.group(1))
        if n not in seen:
            seen.append(n)
    return seen


def citation_correct(reply: str, passages: Sequence[str], reference: str) -> float:
    """1.0 when the reply cites at least one passage, every cited number names a passage that
    was retrieved, and one of them contains the reference answer (normalised text)."""
    cited = cited_indices(reply)
    if not cited or any(not 1 <= n <= len(passages) for n in cited):
        return 0.0
    gold = normalize(reference)
    return float(any(gold in normalize(passages[n - 1]) for n in cited))


def declined(reply: str) -> bool:
    return normalize(reply).startswith(_DECLINES)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Interval:
    difference: float  # mean(b) - mean(a) on the observed questions
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict:
        return {"difference": self.difference, "ci95": [self.low, self.high], "significant": self.significant}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of mean(b) - mean(a), resampling questions (pairs) with
    replacement: both modes answered the same questions, so each resample keeps the pairing."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    differences = [y - x for x, y in zip(a, b)]
    n = len(differences)
    rng = random.Random(seed)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[int((1 - tail) * (resamples - 1) + 0.5)]
    return Interval(sum(differences) / n, low, high)
