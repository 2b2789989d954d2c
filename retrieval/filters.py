"""User filters -> Milvus boolean expressions, safely.

Filters arrive as data: {field: value}, {field: [v1, v2]} or {field: {"gte": a, "lte": b}}.
Field names must be on the allow-list and values must have the field's type; string values are
rendered as escaped literals (Milvus Lite and Milvus 2.3 have no expression templates), so no
user text ever becomes expression syntax.
"""

from __future__ import annotations

import json

from cluster.errors import UserError

# Scalar fields a caller may filter on, with their types.
FILTERABLE_FIELDS: dict[str, type] = {
    "doc_id": str,
    "section": str,
    "source": str,
    "kb_version": int,
    "ingested_at": int,
}
_RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def build_filter(filters: dict | None) -> str:
    if not filters:
        return ""
    if not isinstance(filters, dict):
        raise UserError("filters must be an object of field -> value")
    return " and ".join(_clause(field, value) for field, value in sorted(filters.items()))


def _clause(field: str, value) -> str:
    kind = FILTERABLE_FIELDS.get(field)
    if kind is None:
        allowed = ", ".join(sorted(FILTERABLE_FIELDS))
        raise UserError(f"cannot filter on field {field!r}; allowed: {allowed}")
    if isinstance(value, list):
        if not value:
            raise UserError(f"filter {field}: empty list")
        return f"{field} in [{', '.join(_literal(field, kind, v) for v in value)}]"
    if isinstance(value, dict):
        if kind is not int:
            raise UserError(f"filter {field}: ranges apply to numeric fields only")
        unknown = set(value) - set(_RANGE_OPS)
        if unknown or not value:
            raise UserError(f"filter {field}: range keys must be among {sorted(_RANGE_OPS)}")
        return "(" + " and ".join(f"{field} {_RANGE_OPS[op]} {_literal(field, kind, v)}" for op, v in sorted(value.items())) + ")"
    return f"{field} == {_literal(field, kind, value)}"


def _literal(field: str, kind: type, value) -> str:
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"filter {field}: expected an integer, got {value!r}")
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"filter {field}: expected a string, got {value!r}")
    if any(ord(ch) < 32 for ch in value) or len(value) > 1024:
        raise UserError(f"filter {field}: value has control characters or is too long")
    return json.dumps(value, ensure_ascii=False)


def parse_where(items: list[str]) -> dict:
    """CLI `--where FIELD=VALUE` (repeatable; a repeated field means any of its values)."""
    filters: dict = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep or not field:
            raise UserError(f"--where expects FIELD=VALUE, got {item!r}")
        kind = FILTERABLE_FIELDS.get(field, str)
        try:
            value = int(raw) if kind is int else raw
        except ValueError:
            raise UserError(f"--where {field}: expected an integer, got {raw!r}") from None
        if field in filters:
            previous = filters[field]
            filters[field] = (previous if isinstance(previous, list) else [previous]) + [value]
        else:
            filters[field] = value
    return filters
