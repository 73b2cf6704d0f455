"""Client addresses as keybroker counts and records them (the API's limits, the audit aggregate, connections)."""

from __future__ import annotations

import functools
import ipaddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(value: str) -> IPAddress | None:
    """``value`` as an address; an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) as IPv4."""
    try:
        parsed = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


@functools.lru_cache(maxsize=4096)  # pure; called for every request with one of few peers
def normalise(value: str | None) -> str | None:
    """A peer address as keybroker records it (IPv4-mapped IPv6 as IPv4); anything else unchanged."""
    if value is None:
        return None
    parsed = parse_address(value)
    return str(parsed) if parsed is not None else value


@functools.lru_cache(maxsize=4096)  # pure; called for every request with one of few peers
def client_key(value: str | None) -> str:
    """What limits and aggregates count by: an IPv4 address, or an IPv6 /64 (one host holds a whole /64, so
    counting per /128 would give it 2^64 budgets)."""
    if value is None:
        return "-"
    parsed = parse_address(value)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed) if parsed is not None else value
