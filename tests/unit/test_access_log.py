"""The access line (keybroker.logs.log_request): in JSON it is written without structlog's processor chain, so it
must be exactly the line structlog renders for the same event (the same keys, in the same order, the same values),
and with the console format or above info it goes through structlog as before."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from keybroker import logs
from keybroker.config import LoggingSettings

FIELDS: dict[str, Any] = {
    "method": "POST",
    "path": '/kbs/v1/keys/\u00e9"</script>/transfer',
    "status": 200,
    "duration_ms": 1.23,
    "request_id": "0123456789abcdef0123456789abcdef",
    "client": "::1",
}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logs._ACCESS.fast = None


def test_the_json_line_is_structlogs(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure_logging(LoggingSettings(format="json"))
    assert logs._ACCESS.fast is not None
    logs.log_request(dict(FIELDS))
    structlog.get_logger("keybroker.access.reference").info("request", **FIELDS)  # the same event, structlog's way
    fast, reference = capsys.readouterr().err.splitlines()
    stamp = re.compile(r'"timestamp": "[^"]+"')
    assert stamp.sub("T", fast) == stamp.sub("T", reference)
    parsed = json.loads(fast)
    assert list(parsed) == [*FIELDS, "event", "level", "timestamp", "pid"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", parsed["timestamp"])


def test_console_and_quieter_levels_go_through_structlog() -> None:
    logs.configure_logging(LoggingSettings(format="console"))
    assert logs._ACCESS.fast is None
    logs.configure_logging(LoggingSettings(format="json", level="warning"))
    assert logs._ACCESS.fast is None  # an info line: structlog's level filter drops it
    logs.configure_logging(LoggingSettings(format="json", level="debug"))
    assert logs._ACCESS.fast is not None
