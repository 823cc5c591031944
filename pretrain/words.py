"""Words for messages to people: a count with its noun in the right number ("1 rank", "2 ranks")."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, the noun in the plural unless `n` is 1 (the plural is `noun` + "s" unless
    given)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
