"""RFC 9457 problem details as keybroker sends them (PROTOCOL.md, conventions)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Problem:
    status: int
    code: str
    title: str
    detail: str
    reasons: tuple[dict[str, str], ...] = ()
    errors: tuple[dict[str, str], ...] = ()
    request_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_response(cls, status: int, content_type: str, body: bytes) -> Problem:
        """Parse a problem+json body; anything else becomes a generic problem with the HTTP status."""
        data: Any = None
        if "json" in content_type:
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                data = None
        if not isinstance(data, dict):
            text = body[:200].decode("utf-8", errors="replace").strip()
            return cls(status=status, code=f"http_{status}", title=f"HTTP {status}", detail=text or "no details")
        return cls(
            status=int(data.get("status", status)),
            code=str(data.get("code", f"http_{status}")),
            title=str(data.get("title", "")),
            detail=str(data.get("detail", "")),
            reasons=tuple(r for r in data.get("reasons", []) if isinstance(r, dict)),
            errors=tuple(e for e in data.get("errors", []) if isinstance(e, dict)),
            request_id=data.get("request_id"),
            raw=data,
        )

    def describe(self) -> str:
        lines = [f"{self.detail or self.title} ({self.code}, HTTP {self.status})"]
        lines += [f"  - {r.get('code', '')}: {r.get('detail', '')}" for r in self.reasons]
        lines += [f"  - {e.get('loc') or '(body)'}: {e.get('msg', '')}" for e in self.errors]
        if self.request_id:
            lines.append(f"  request id: {self.request_id}")
        return "\n".join(lines)
