"""The Playground's pagination: `page`, `limit`, `sort`, and the `pagination` object."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.core.errors import BadRequest


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


def parse_page(page: str | None, limit: str | None, sort: str | None) -> Page:
    """The Playground's `page` (from 1), `limit` (default 20, at most 100), `sort`."""
    try:
        number = 1 if page in (None, "") else int(page)
        size = 20 if limit in (None, "") else int(limit)
    except ValueError:
        raise BadRequest("`page` and `limit` must be whole numbers") from None
    if number < 1 or not 1 <= size <= 100:
        raise BadRequest("`page` must be at least 1 and `limit` 1-100")
    if sort not in (None, "", "asc", "desc"):
        raise BadRequest("`sort` must be asc or desc")
    return Page(number, size, sort != "asc")
