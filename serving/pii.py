"""Personal data in text: email addresses, phone numbers and payment card numbers.

Precision matters as much as recall here: a detector that eats part numbers, dates and prices
breaks answers. So cards must pass the Luhn checksum with 13-19 digits, phone numbers need
10-15 digits in the usual groupings (or a leading +), and digit runs inside longer numbers or
identifiers never count. Short local numbers (7 digits) are not detected: too many codes and
quantities look the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
# Digit groups separated by one space or dash: 4-4-4-4, 4-6-5 (Amex) and unbroken runs.
CARD = re.compile(r"(?<![\w.,/+-])\d(?:[ -]?\d){12,18}(?![\w.,/-]?\d)")
# Optional +country code, then groups of digits with single separators; optional (area) code.
PHONE = re.compile(r"(?<![\w.,/+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}(?![\w.,/-]?\d)"
                   r"|(?<![\w.,/+-])\+\d{8,15}\b")
_NOT_PHONE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$"  # dates
                        r"|^\d{1,3}(?:\.\d{1,3}){3}$")  # IPv4 addresses

PLACEHOLDER = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}


@dataclass(frozen=True)
class Found:
    kind: str
    start: int
    end: int


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_phone(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if _NOT_PHONE.match(text):
        return False
    return 10 <= len(digits) <= 15 or text.startswith("+") and 8 <= len(digits) <= 15


def find(text: str) -> list[Found]:
    """Non-overlapping findings, in text order (emails first, then cards, then phones)."""
    found: list[Found] = []
    taken = [False] * len(text)

    def claim(kind: str, m: re.Match) -> None:
        if not any(taken[m.start():m.end()]):
            found.append(Found(kind, m.start(), m.end()))
            taken[m.start():m.end()] = [True] * (m.end() - m.start())

    for m in EMAIL.finditer(text):
        claim("email", m)
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn(digits):
            claim("card", m)
    for m in PHONE.finditer(text):
        if _is_phone(m.group()):
            claim("phone", m)
    return sorted(found, key=lambda f: f.start)


def redact(text: str, found: list[Found] | None = None) -> tuple[str, dict[str, int]]:
    """The text with each finding (by default: `find(text)`) replaced by its placeholder, and
    counts per kind."""
    counts: dict[str, int] = {}
    parts, last = [], 0
    for f in find(text) if found is None else found:
        parts += [text[last:f.start], PLACEHOLDER[f.kind]]
        counts[f.kind] = counts.get(f.kind, 0) + 1
        last = f.end
    parts.append(text[last:])
    return "".join(parts), counts
