"""Keyset pagination over ``(created_at, id)``: stable under inserts, O(page) per request."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute

from keybroker.errors import InvalidRequest

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


class _Listed(Protocol):
    created_at: datetime
    id: str


R = TypeVar("R", bound=_Listed)


@dataclass(frozen=True, slots=True)
class Page:
    limit: int = DEFAULT_LIMIT
    after: tuple[datetime, str] | None = None

    @classmethod
    def parse(cls, limit: int | None, cursor: str | None) -> Page:
        if limit is None:
            limit = DEFAULT_LIMIT
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}", code="invalid_limit")
        return cls(limit, decode_cursor(cursor) if cursor else None)

    def apply(
        self,
        query: Select[Any],
        created_at: InstrumentedAttribute[datetime],
        ident: InstrumentedAttribute[str],
    ) -> Select[Any]:
        if self.after is not None:
            at, after_id = self.after
            query = query.where(or_(created_at > at, and_(created_at == at, ident > after_id)))
        # One extra row tells whether there is a next page.
        return query.order_by(created_at, ident).limit(self.limit + 1)

    def cut(self, rows: list[R]) -> tuple[list[R], str | None]:
        """This page's rows (``apply`` fetched one more) and the cursor of the next page, if there is one."""
        if len(rows) <= self.limit:
            return rows, None
        rows = rows[: self.limit]
        last = rows[-1]
        return rows, encode_cursor(last.created_at, last.id)


def encode_cursor(created_at: datetime, ident: str) -> str:
    raw = json.dumps([created_at.isoformat(), ident], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, ident = json.loads(raw)
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None or not isinstance(ident, str) or len(ident) > 64:
            raise ValueError
        parsed = parsed.astimezone(UTC)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError, RecursionError):
        raise InvalidRequest("cursor is not one this server issued", code="invalid_cursor") from None
    return parsed, ident
