"""Tables printed to a pipe are plain lines (no rich import): the same text as rich's table where nothing folds."""

from __future__ import annotations

import io

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
