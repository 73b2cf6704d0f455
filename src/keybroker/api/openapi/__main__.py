"""``python -m keybroker.api.openapi [FILE]``: the document ``/openapi.json`` serves, to stdout or FILE.

docs/openapi.json is made with it (``.venv/bin/python -m keybroker.api.openapi docs/openapi.json``); a test fails
when the two differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from keybroker import __version__
from keybroker.api.app import api_routes
from keybroker.api.openapi import build_document


def document() -> dict[str, Any]:
    """The document of a server that serves every route (``keybroker serve``, role ``all``)."""
    return build_document("keybroker", __version__, api_routes())


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render(document())
    if not argv:
        sys.stdout.write(text)
        return 0
    Path(argv[0]).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
