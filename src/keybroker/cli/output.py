"""Printing for humans (rich tables) or scripts (``--output json``, stable field names from the API)."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Tables are for reading and grepping; when piped, keep one row per line instead of folding to 80 columns.
stdout = Console(width=None if sys.stdout.isatty() else 250)
# Messages are never folded or cut (soft_wrap) and never read as markup (a path or a server's detail may hold
# "[...]"); on a terminal the label of say() is coloured, elsewhere everything is plain text for scripts.
stderr = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def say(label: str, message: str = "", style: str = "red") -> None:
    """``label`` (coloured on a terminal), then ``message`` exactly as given, on stderr."""
    stderr.print(Text.assemble((label, style), " " if label and message else "", message))


class Output(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    ID = "id"  # only the id(s), one per line: POLICY=$(keybroker policy create p.json -o id)


def emit(value: dict[str, Any] | list[dict[str, Any]], fmt: Output, human: Callable[[], None]) -> None:
    """Print a resource (or a list of them) in the chosen format; ``human`` prints the table form."""
    if fmt is Output.JSON:
        emit_json(value)
    elif fmt is Output.ID:
        for item in value if isinstance(value, list) else [value]:
            sys.stdout.write(f"{item['id']}\n")
    else:
        human()


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def key_row(key: dict[str, Any]) -> list[str]:
    info = key.get("key_information", {})
    size = info.get("curve_type") or str(info.get("key_length", ""))
    return [
        key["id"],
        info.get("algorithm", ""),
        size,
        key.get("label") or "",
        key.get("transfer_policy_id", ""),
        key.get("backend", ""),
        short_time(key.get("created_at", "")),
    ]


def short_time(value: str) -> str:
    """``2026-11-27T13:13:43.244204Z`` -> ``2026-11-27 13:13:43Z``."""
    return value[:19].replace("T", " ") + "Z" if len(value) >= 19 else value


KEY_COLUMNS = ("ID", "ALGORITHM", "SIZE", "LABEL", "POLICY", "BACKEND", "CREATED")


def policy_row(policy: dict[str, Any]) -> list[str]:
    types = policy.get("attestation_type", [])
    return [
        policy["id"],
        ",".join(types),
        "yes" if policy.get("immutable") else "no",
        "yes" if policy.get("allow_simulated") else "no",
        short_time(policy.get("created_at", "")),
    ]


POLICY_COLUMNS = ("ID", "TEE", "IMMUTABLE", "SIMULATED", "CREATED")


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    out = Table(show_edge=False, box=None, header_style="bold")
    for column in columns:
        out.add_column(column, no_wrap=column in ("ID", "POLICY", "CREATED"))
    for row in rows:
        out.add_row(*row)
    stdout.print(out)


def details(value: dict[str, Any]) -> None:
    """A resource as indented JSON (nested policies read best that way)."""
    stdout.print_json(json.dumps(value))
