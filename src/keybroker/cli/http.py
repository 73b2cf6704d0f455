"""The CLI's HTTP side: finds the server like Vault's CLI does (flags, then KEYBROKER_* variables).

Requests go over the standard library's ``http.client`` (one keep-alive connection per command, TLS verified with
``ssl``), not httpx: a command then starts without importing httpx and the client library (about a third of
``keybroker key list``'s time, bench/cli.py). The proxy variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``)
are honoured as httpx honours them. keybroker_client (problem details, errors, CA pinning) is imported only when
a pin is given or something went wrong.

When the connection fails the way a mistake makes it fail (no CA given for the service's own CA, the wrong CA file,
http:// on the TLS port, https:// on a plain one, nothing listening), the error says what to do, in the CLI's own
terms (``--cacert``/``KEYBROKER_CACERT``, ``--ca-fingerprint``/``KEYBROKER_CA_FINGERPRINT``, ``--addr``). Pins
are the client library's: several, comma-separated, each matching any CA the server publishes (a CA rotation)."""

from __future__ import annotations

import contextlib
import json as jsonlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from keybroker.cli.addresses import check_plain, valid_host, without_password

if TYPE_CHECKING:
    import http.client
    import ssl
    import threading

# (http.client, ssl and socket are imported when a request is made: not by the help, or a local command.)

DEFAULT_ADDR = "https://127.0.0.1:9443"
TIMEOUT_SECONDS = 60.0  # (per connect and per read)
DEADLINE_SECONDS = 60.0  # the whole of one request: a server that trickles its answer does not hold a command
# The success status of each method's answer (POST: 201 for a resource created, 200 for an action); any other
# status, a 3xx above all (a redirect is never followed: it would carry the token elsewhere), is an error.
EXPECTED_STATUS = {"GET": (200,), "PUT": (200,), "DELETE": (204,), "POST": (200, 201)}

TRUST_HINT = (
    "give the deployment's CA certificate with --cacert FILE or KEYBROKER_CACERT=FILE (the server's "
    "DATA_DIR/ca.pem), or pin it with --ca-fingerprint or KEYBROKER_CA_FINGERPRINT ('keybroker ca fingerprint' "
    "on the server prints it)"
)
# What OpenSSL says when the peer does not speak TLS (an https:// URL on a plain-HTTP port).
_NOT_TLS = ("WRONG_VERSION_NUMBER", "record layer failure", "packet length too long", "HTTP_REQUEST")
_OPENSSL_PLACE = re.compile(r" \(_ssl\.c:\d+\)$")


def _disconnected() -> tuple[type[Exception], ...]:
    """A connection closed before the answer: on a reused keep-alive connection, a GET is sent once more."""
    import http.client

    return (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _transport_error(message: str) -> Exception:
    from keybroker_client import TransportError

    return TransportError(message)


@dataclass(frozen=True)
class Connection:
    addr: str
    token: str | None
    cacert: str | None
    ca_fingerprint: str | None = None

    def target(self) -> tuple[str, str, int, str]:
        """(scheme, host, port, path prefix) of ``addr``; an error saying what is wrong with it."""
        wrong = _transport_error(
            f"{self.addr!r} is not a keybroker address (--addr/KEYBROKER_ADDR): give a URL like {DEFAULT_ADDR}"
        )
        try:
            parts = urlsplit(self.addr.strip())
            port = parts.port
        except ValueError:  # ("Invalid IPv6 URL", a port out of range)
            raise wrong from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise wrong
        if not valid_host(parts.hostname):
            raise _transport_error(
                f"{self.addr!r} is not a keybroker address (--addr/KEYBROKER_ADDR): {parts.hostname!r} is not a "
                "host name or address"
            )
        path = quote(parts.path.rstrip("/"), safe="/%")  # (a path prefix in another script than ASCII: escaped)
        return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path

    def ssl_context(self) -> ssl.SSLContext:
        import ssl

        if self.cacert and self.ca_fingerprint:  # (the client library refuses both too: one would go unused)
            from keybroker.errors import ConfigurationError

            raise ConfigurationError(
                "give --cacert/KEYBROKER_CACERT (the CA file) or --ca-fingerprint/KEYBROKER_CA_FINGERPRINT (its "
                "SHA-384), not both"
            )
        if self.cacert:
            try:
                return ssl.create_default_context(cafile=self.cacert)
            except ssl.SSLError:
                reason = "it holds no PEM certificate (give the deployment's ca.pem)"
            except IsADirectoryError:
                reason = "it is a directory, not a file"
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
            raise _transport_error(f"cannot use the CA certificate {self.cacert} (--cacert/KEYBROKER_CACERT): {reason}")
        if self.ca_fingerprint:
            from keybroker_client import ssl_context

            return ssl_context(self.addr, None, self.ca_fingerprint)
        return ssl.create_default_context()


@dataclass(frozen=True)
class Response:
    """What the commands read of an answer (the names are httpx's: ``status_code``, ``headers``, ``json()``)."""

    status_code: int
    headers: http.client.HTTPMessage  # (case-insensitive .get)
    content: bytes
    where: str

    def json(self) -> Any:
        try:
            return jsonlib.loads(self.content)
        except ValueError:
            raise _transport_error(
                f"{self.where} answered HTTP {self.status_code} with a body that is not JSON"
            ) from None


class AdminApi:
    """The server's admin API over one keep-alive connection. Nothing is read or checked before the first request
    (a command that then does not ask the server, such as ``backends check --offline``, is not refused over a CA
    file it does not need)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._open: http.client.HTTPConnection | None = None
        self._headers = {"Accept": "application/json", "User-Agent": "keybroker-cli"}
        if connection.token:
            self._headers["Authorization"] = f"Bearer {connection.token}"
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:
            self._scheme, self._host, self._port, self._prefix = self._connection.target()
            check_plain(self._connection, self._scheme, self._host)
            self._context = self._connection.ssl_context() if self._scheme == "https" else None
            self._proxy = _proxy_for(self._scheme, self._host)
            self._ready = True

    def __enter__(self) -> AdminApi:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def _connect(self) -> http.client.HTTPConnection:
        import http.client

        host, port = self._proxy or (self._host, self._port)
        if self._scheme == "https":
            opened: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=TIMEOUT_SECONDS, context=self._context
            )
            if self._proxy:
                opened.set_tunnel(self._host, self._port)  # (TLS to the server itself, through CONNECT)
            return opened
        return http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        expect: tuple[int, ...] | None = None,
    ) -> Response:
        """The answer to one request: a problem's ProblemError, or a one-line error for any status but the one
        expected (``expect``, else the method's in EXPECTED_STATUS)."""
        self._prepare()
        target = self._prefix + path
        if params:
            target += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        if self._proxy and self._scheme == "http":
            target = f"http://{_netloc(self._host, self._port)}{target}"  # (a plain proxy takes the whole URL)
        headers = dict(self._headers)
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        reused = self._open is not None
        try:
            answer = self._exchange(method, target, body, headers)
        except _disconnected() as exc:
            if not (reused and method == "GET"):
                raise unreachable(exc, self._connection) from None
            try:  # an idle keep-alive connection that the server closed meanwhile: once more on a new one
                answer = self._exchange(method, target, body, headers)
            except _disconnected() as again:
                raise unreachable(again, self._connection) from None
        status, response_headers, content = answer
        where = f"{self._connection.addr}{path}"
        if status >= 400:
            from keybroker_client import Problem, ProblemError

            problem = Problem.from_response(status, response_headers.get("content-type", ""), content)
            raise ProblemError(problem)
        if 300 <= status < 400:
            from keybroker.cli.output import printable

            location = printable(response_headers.get("location") or "(no Location given)")
            raise _transport_error(
                f"{where} answered a redirect to {location}; keybroker does not follow redirects (they would carry "
                "your token): use that address (--addr/KEYBROKER_ADDR)"
            )
        if status not in (expect or EXPECTED_STATUS.get(method) or tuple(range(200, 300))):
            raise _transport_error(
                f"{where} answered HTTP {status} to {method}, not a keybroker answer: is it a keybroker?"
            )
        return Response(status, response_headers, content, where)

    def _exchange(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request and its answer; the connection is dropped after a failure (the next request opens one)."""
        import http.client
        import threading

        expired = threading.Event()
        timer = threading.Timer(DEADLINE_SECONDS, self._expire, (expired,))
        timer.daemon = True
        timer.start()
        try:
            if self._open is None:
                self._open = self._connect()
            self._open.request(method, target, body=body, headers=headers)  # (ids in it are escaped: segment())
            response = self._open.getresponse()
            content = response.read()
        except _disconnected() as exc:
            self._drop()
            if expired.is_set():
                raise self._late() from None
            raise exc from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if expired.is_set():
                raise self._late() from None
            raise unreachable(exc, self._connection, self._proxy) from None
        finally:
            timer.cancel()
        if expired.is_set():
            self._drop()
            raise self._late()
        if response.will_close:
            self._drop()
        return response.status, response.headers, content

    def _expire(self, expired: threading.Event) -> None:
        """At the deadline (a timer's thread): the socket is shut down, so that the read waiting on it ends."""
        import socket

        expired.set()
        opened = self._open
        sock = getattr(opened, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # (already closed)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # (the plain socket's: under TLS too)

    def _late(self) -> Exception:
        return _transport_error(
            f"cannot reach keybroker at {self._connection.addr}: no complete answer within {DEADLINE_SECONDS:.0f} s "
            "(is it a keybroker, and is it overloaded?)"
        )

    def _drop(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def get_json(self, path: str, params: dict[str, Any] | None = None, shape: Any = (dict, list)) -> Any:
        """The JSON answer to a GET, of ``shape`` (cli.answers) or a one-line "unexpected answer" error."""
        from keybroker.cli.answers import checked

        response = self.request("GET", path, params=params)
        return checked(response.json(), shape, response.where)

    def list_all(self, path: str, params: dict[str, Any], fetch_all: bool, shape: Any = (dict,)) -> list[Any]:
        """Every page's items (``shape``: an item's, cli.answers), or the first page's unless ``fetch_all``."""
        from keybroker.cli.answers import checked

        items: list[Any] = []
        query = dict(params)
        while True:
            response = self.request("GET", path, params=query)
            items.extend(checked(response.json(), [shape], response.where))
            cursor = response.headers.get("x-next-cursor")
            if not cursor or not fetch_all:
                return items
            query["cursor"] = cursor


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The proxy of ``HTTPS_PROXY``/``HTTP_PROXY`` (or lower case) for ``host`` unless ``NO_PROXY`` exempts it."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):  # (NO_PROXY)
        return None
    try:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme != "http" or not parts.hostname or not valid_host(parts.hostname):
        raise _transport_error(
            f"the proxy {without_password(proxy)} ({scheme.upper()}_PROXY) is not an http:// proxy URL"
        )
    return parts.hostname, port or 80


def unreachable(exc: Exception, connection: Connection, proxy: tuple[str, int] | None = None) -> Exception:
    """The error for a request that got no answer: what happened and, for the usual mistakes, what to do."""
    import ssl

    text = _OPENSSL_PLACE.sub("", str(exc)) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        text = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        text = exc.strerror
    hint = _hint(exc, connection)
    if proxy is not None and isinstance(exc, ConnectionRefusedError | TimeoutError):  # (the proxy's, not the server's)
        hint = f"the proxy {_netloc(*proxy)} (HTTPS_PROXY/HTTP_PROXY) refused the connection: is it running?"
        if isinstance(exc, TimeoutError):
            hint = f"the proxy {_netloc(*proxy)} (HTTPS_PROXY/HTTP_PROXY) gave no answer"
    where = f"cannot reach keybroker at {connection.addr}"
    return _transport_error(f"{where}: {hint} ({text})" if hint else f"{where}: {text}")


def _hint(exc: Exception, connection: Connection) -> str:  # noqa: PLR0911 - one answer per mistake told apart
    """What to do about ``exc``, for the failures that a wrong option or variable causes; "" for the others."""
    import socket
    import ssl

    scheme, host, port, _ = connection.target()
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _trust_hint(exc, connection, host)
    if scheme == "https" and isinstance(exc, ssl.SSLError) and any(marker in str(exc) for marker in _NOT_TLS):
        return f"it does not speak TLS on port {port}: use http:// if it serves plain HTTP, else check the port"
    if scheme == "http" and isinstance(exc, _disconnected()) and speaks_tls(host, port):
        return f"it speaks TLS on port {port}: use https://{_netloc(host, port)} (--addr/KEYBROKER_ADDR)"
    if isinstance(exc, ConnectionRefusedError):
        return "nothing listens there: is keybroker running, and is --addr/KEYBROKER_ADDR its address?"
    if isinstance(exc, socket.gaierror):
        return f"the name {host} does not resolve: check --addr/KEYBROKER_ADDR"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT_SECONDS:.0f} s"
    return ""


def _trust_hint(exc: ssl.SSLCertVerificationError, connection: Connection, host: str) -> str:
    if "mismatch" in str(exc):  # "Hostname mismatch", "IP address mismatch"
        return f"its certificate is not issued for {host}: use a name it was issued for (the server's tls.san)"
    if connection.cacert:
        return (
            f"its certificate does not chain to {connection.cacert} (--cacert/KEYBROKER_CACERT): give this "
            "deployment's ca.pem"
        )
    if connection.ca_fingerprint:
        return (
            "its certificate does not chain to the pinned CA: is it a replica of the same deployment? (During a CA "
            "rotation pin the old and the new CA: --ca-fingerprint OLD,NEW or KEYBROKER_CA_FINGERPRINT=OLD,NEW)"
        )
    return f"its certificate is not trusted: {TRUST_HINT}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (a ClientHello only: nothing is sent over it)."""
    import socket
    import ssl

    if not host or not port:
        return False
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # only asks whether TLS is spoken there: nothing is trusted or sent
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, probe.wrap_socket(raw):
            return True
    except (OSError, ValueError):
        return False
