"""Printing for humans (rich tables) or scripts (``--output json``, stable field names from the API).

rich is imported when something is first printed (``stdout``, ``stderr``, ``say``, ``table``, ``details``), not
with this module: the help and the commands that print nothing through rich do not pay for it."""

from __future__ import annotations

import enum
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    stdout: Console
    stderr: Console


def _consoles() -> dict[str, Console]:
    from rich.console import Console

    return {
        # Tables are for reading and grepping; when piped, keep one row per line instead of folding to 80 columns.
        "stdout": Console(width=None if sys.stdout.isatty() else 250),
        # Messages are never folded or cut (soft_wrap) and never read as markup (a path or a server's detail may
        # hold "[...]"); on a terminal the label of say() is coloured, elsewhere everything is plain text.
        "stderr": Console(stderr=True, soft_wrap=True, markup=False, highlight=False),
    }


def __getattr__(name: str) -> Any:
    """``stdout`` and ``stderr``: the two consoles, made on first use (PEP 562)."""
    if name in ("stdout", "stderr"):
        globals().update(_consoles())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console(name: str) -> Console:
    """``stdout`` or ``stderr`` from inside this module (where a global name does not reach ``__getattr__``)."""
    console: Console = globals().get(name) or __getattr__(name)
    return console


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` from a server's answer, safe on a terminal: line breaks and tabs become spaces, other control
    characters (escape sequences) are shown escaped (``\\x1b``), never sent to the terminal."""
    return _CONTROL.sub(lambda m: " " if m.group() in "\n\r\t" else m.group().encode("unicode_escape").decode(), text)


def say(label: str, message: str = "", style: str = "red") -> None:
    """``label`` (coloured on a terminal), then ``message`` exactly as given, on stderr."""
    from rich.text import Text

    _console("stderr").print(Text.assemble((label, style), " " if label and message else "", message))


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
            sys.stdout.write(f"{printable(str(item['id']))}\n")  # (a server's text: no escape sequences)
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
    if not isinstance(value, str):  # (a server's answer of another shape: shown as it is)
        return str(value)
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
    """Columns for people: on a terminal rich's table (bold header, folded to the terminal's width); elsewhere the
    same text as plain lines, one row per line however wide, without importing rich (scripts, pipes, grep)."""
    if not sys.stdout.isatty():
        sys.stdout.write(plain_table(columns, rows))
        return
    from rich.table import Table
    from rich.text import Text

    console = _console("stdout")
    cells = [[printable(str(cell)) for cell in row] for row in rows]  # (a server's text: never escapes)
    shown = fitting(columns, cells, console.width)
    out = Table(show_edge=False, box=None, header_style="bold")
    for i in shown:
        whole = (i == 0 or columns[i] in WHOLE) and _widest(columns, cells, i) + 2 <= console.width
        # An id is never cut ("…"): it stays on one line, or (wider than the terminal alone) folds, every character
        # kept; the other columns fold too rather than lose characters.
        out.add_column(
            columns[i],
            no_wrap=whole or columns[i] == "CREATED",
            overflow="fold",
            min_width=_widest(columns, cells, i) if whole else None,
        )
    for row in cells:
        out.add_row(*(Text(row[i]) for i in shown))  # (never read as markup)
    console.print(out)
    if len(shown) < len(columns):
        left_out = ", ".join(column for i, column in enumerate(columns) if i not in shown)
        say("", f"(not shown at this width: {left_out}; -o json shows every field)")


# The columns whose values a user copies (ids, names): never cut; the first column of every table is one too.
WHOLE = frozenset({"ID", "POLICY", "KEK", "ROLE", "NAME", "KEY", "SEQ"})


def _widest(columns: Sequence[str], cells: Sequence[Sequence[str]], i: int) -> int:
    return max(_width(line[i]) for line in [columns, *cells])


def fitting(columns: Sequence[str], cells: Sequence[Sequence[str]], width: int) -> list[int]:
    """The columns (indices, in order) a table of ``width`` cells shows: the first and the WHOLE ones at their full
    width while they fit (the first always), then the others, at a few cells at least, while they fit."""
    chosen: list[int] = [0] if columns else []
    used = _widest(columns, cells, 0) + 2 if columns else 0
    for i, column in enumerate(columns[1:], start=1):
        if column in WHOLE and used + _widest(columns, cells, i) + 2 <= width:
            chosen.append(i)
            used += _widest(columns, cells, i) + 2
    for i in range(1, len(columns)):
        if i not in chosen:
            least = min(_widest(columns, cells, i), max(_width(columns[i]), 8)) + 2
            if used + least <= width:
                chosen.append(i)
                used += least
    return sorted(chosen)


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The lines rich prints for ``table`` when nothing has to fold: every cell padded to its column's width, with
    one space on either side."""
    lines = [list(columns), *([printable(str(cell)) for cell in row] for row in rows)]
    widths = [max(_width(line[i]) for line in lines) for i in range(len(columns))]
    return "".join(
        "".join(f" {cell}{' ' * (width - _width(cell))} " for cell, width in zip(line, widths, strict=True)) + "\n"
        for line in lines
    )


def _width(text: str) -> int:
    """Terminal cells of ``text``: wide (East Asian) characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def details(value: dict[str, Any]) -> None:
    """A resource as indented JSON (nested policies read best that way)."""
    _console("stdout").print_json(json.dumps(value))
