"""Checking the values a workload passes in (measurements, report data): hex strings or bytes, each refused with
its reason as a ``ConfigurationError`` before anything is built or sent."""

from __future__ import annotations

from keybroker_client._errors import ConfigurationError


def hex_or_bytes(name: str, value: object, length: int) -> bytes:
    """``value`` as exactly ``length`` bytes: given as bytes (or bytearray, memoryview) or as hex digits."""
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise ConfigurationError(
                f"{name} is not hexadecimal: give {2 * length} hex digits or {length} bytes"
            ) from None
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    else:
        raise ConfigurationError(f"{name} is a {type(value).__name__}: give {2 * length} hex digits or {length} bytes")
    if len(raw) != length:
        raise ConfigurationError(f"{name} must be {length} bytes ({2 * length} hex digits), not {len(raw)}")
    return raw


def uint16(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ConfigurationError(f"{name} is an integer from 0 to 65535, not {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} is True or False, not {value!r}")
    return value


def report_data(value: object) -> bytes:
    """The 64 bytes of REPORTDATA a quote is asked for."""
    return hex_or_bytes("report data", value, 64)
