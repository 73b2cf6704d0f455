"""Tables printed to a pipe are plain lines (no rich import): the same text as rich's table where nothing folds."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console
from rich.table import Table
from rich.text import Text

from keybroker.cli import output

TABLES = {
    "keys": (
        output.KEY_COLUMNS,
        [
            [
                "8a046a1f-d937-48c0-96f2-d0ca5e233069",
                "AES",
                "256",
                "",
                "3c0e0000-0000-4000-8000-000000000000",
                "embedded",
                "2026-12-04 18:35:43Z",
            ],
            ["1b2c", "RSA", "3072", "tls", "3c0e", "vault", "2026-12-04 18:35:44Z"],
        ],
    ),
    "empty": (output.POLICY_COLUMNS, []),
    "markup and wide characters": (("ID", "LABEL"), [["a", "[bold]not markup[/bold]"], ["b", "鍵 ключ é"]]),
}


def _rich(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    out = io.StringIO()
    table = Table(show_edge=False, box=None, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=column in ("ID", "POLICY", "CREATED"))
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    Console(file=out, width=250, color_system=None).print(table)
    return out.getvalue()


@pytest.mark.parametrize("name", list(TABLES))
def test_the_plain_table_is_riches_text(name: str) -> None:
    columns, rows = TABLES[name]
    assert output.plain_table(columns, rows) == _rich(tuple(columns), rows)


def test_a_piped_table_is_plain(capsys: pytest.CaptureFixture[str]) -> None:
    output.table(("ID", "LABEL"), [["a", "[red]x"]])
    assert capsys.readouterr().out == " ID  LABEL  \n a   [red]x \n"


KEY_ID = "8a046a1f-d937-48c0-96f2-d0ca5e233069"
POLICY_ID = "3c0e0000-0000-4000-8000-000000000000"


def _on_a_terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> tuple[io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(output, "stdout", Console(file=out, width=width, color_system=None), raising=False)
    monkeypatch.setattr(output, "stderr", Console(file=err, width=width, color_system=None, soft_wrap=True),
                        raising=False)  # fmt: skip
    return out, err


@pytest.mark.parametrize("width", [80, 60, 40])
def test_ids_are_never_cut_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    out, err = _on_a_terminal(monkeypatch, width)
    rows = [[KEY_ID, "AES", "256", "a rather long label for a key", POLICY_ID, "embedded", "2026-12-04 18:35:43Z"]]
    output.table(output.KEY_COLUMNS, rows)
    shown = out.getvalue()
    assert "…" not in shown
    assert KEY_ID in shown  # whole, on one line: a double-click copies it
    assert all(len(line) <= width for line in shown.splitlines())
    if POLICY_ID not in shown:  # left out at this width, and said so (not cut)
        assert POLICY_ID[:8] not in shown
        assert "POLICY" in err.getvalue()
        assert "-o json shows every field" in err.getvalue()
    if width >= 80:
        assert POLICY_ID in shown


def test_an_id_wider_than_the_terminal_folds_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _on_a_terminal(monkeypatch, 20)
    output.table(("ID", "LABEL"), [[KEY_ID, "x"]])
    assert "…" not in out.getvalue()
    assert "".join(line.strip() for line in out.getvalue().splitlines()[1:]).startswith(KEY_ID)


def test_a_servers_control_characters_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = _on_a_terminal(monkeypatch, 120)
    output.table(("ID", "LABEL"), [["a", "\x1b[2Jcleared\x07\nsecond"]])
    assert "\x1b" not in out.getvalue()
    assert "\\x1b[2Jcleared\\x07 second" in out.getvalue()
    plain = output.plain_table(("ID",), [["\x1b]0;title\x07"]])
    assert "\x1b" not in plain
    assert "\\x1b]0;title\\x07" in plain
