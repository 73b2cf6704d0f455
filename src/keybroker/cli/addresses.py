"""Checks of the addresses the CLI is given (the server's, a proxy's) and of what may be sent to them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keybroker.cli.http import Connection

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def check_plain(connection: Connection, scheme: str, host: str) -> None:
    """Before anything is sent: http:// with a CA or a pin given is refused (the token would go in clear where TLS
    was meant); http:// with a token to another host than this one gets a warning on stderr."""
    if scheme != "http":
        return
    if connection.cacert or connection.ca_fingerprint:
        from keybroker.errors import ConfigurationError

        given = "--cacert/KEYBROKER_CACERT" if connection.cacert else "--ca-fingerprint/KEYBROKER_CA_FINGERPRINT"
        raise ConfigurationError(
            f"{connection.addr} is plain HTTP but {given} is given: the token would cross the network in clear; "
            "use https:// (or leave out the CA)"
        )
    if connection.token and host.lower() not in _LOOPBACK and not host.startswith("127."):
        import sys

        sys.stderr.write(
            f"Warning: {connection.addr} is plain HTTP: the token crosses the network in clear (use https://)\n"
        )


def without_password(url: str) -> str:
    """``url`` as shown in a message: a password in it (http://user:PASSWORD@proxy) is not."""
    before, at, after = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = before.rpartition("://")
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{after}" if ":" in userinfo else url


def valid_host(host: str) -> bool:
    """Whether ``host`` can be looked up (an IP address, or a name that IDNA encodes: no empty label, none of
    more than 63 characters, no undecodable byte)."""
    if ":" in host:  # (an IPv6 address, from within [...])
        import ipaddress

        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return False
        return True
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True
