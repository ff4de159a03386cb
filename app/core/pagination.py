"""The Playground's pagination: `page`, `limit`, `sort`, and the `pagination` object."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.core.errors import BadRequest

# Past this an offset only makes the database scan: refused, as is overflowing BIGINT.
MAX_OFFSET = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Page:
    number: int
    size: int
    descending: bool

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    def describe(self, total: int) -> dict[str, Any]:
        pages = math.ceil(total / self.size) if total else 0
        return {
            "page": self.number,
            "limit": self.size,
            "total": total,
            "pages": pages,
            "has_next": self.number < pages,
            "has_prev": self.number > 1,
        }


def _whole_number(text: str | None, default: int) -> int:
    """`text` as a number written in ASCII digits, or `default` when it is absent.

    `int` alone also takes signs, spaces, "1_000" and other scripts' digits, which no
    client means as a page number.
    """
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def parse_page(page: str | None, limit: str | None, sort: str | None) -> Page:
    """The Playground's `page` (from 1), `limit` (default 20, at most 100), `sort`."""
    try:
        number = _whole_number(page, 1)
        size = _whole_number(limit, 20)
    except ValueError:
        raise BadRequest("`page` and `limit` must be whole numbers") from None
    if not 1 <= number <= MAX_OFFSET // 100 or not 1 <= size <= 100:
        raise BadRequest(f"`page` must be 1-{MAX_OFFSET // 100} and `limit` 1-100")
    if sort not in (None, "", "asc", "desc"):
        raise BadRequest("`sort` must be asc or desc")
    return Page(number, size, sort != "asc")


def parse_offset(
    limit: str | None, offset: str | None, default: int, maximum: int
) -> tuple[int, int]:
    """Navi's `limit` / `offset` query parameters, checked."""
    try:
        size = _whole_number(limit, default)
        start = _whole_number(offset, 0)
    except ValueError:
        raise BadRequest("`limit` and `offset` must be whole numbers") from None
    if not 1 <= size <= maximum or not 0 <= start <= MAX_OFFSET:
        raise BadRequest(f"`limit` must be 1-{maximum} and `offset` 0-{MAX_OFFSET}")
    return size, start
