"""A guarded single-statement write (PostgreSQL): a data-modifying CTE that has to produce ``expected`` rows for
the statement it leads to take effect, e.g. the nonce a transfer uses up (``NonceService.consume_guard``) guarding
the transfer's audit entry (``AuditLog.append_guarded``): one round trip, one atomic statement."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Guard:
    sql: str  # a data-modifying statement with RETURNING; its bind names start with ``g_``
    expected: int  # the rows it must return
    params: Mapping[str, Any] = field(default_factory=dict, repr=False)
