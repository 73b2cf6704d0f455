"""The one table that turns hvac's and requests' exceptions into keybroker's errors, for the Vault / OpenBao
session (``session``), the KV store and the Transit wrapper: which are outages (``BackendUnavailable``, retried
later), which are an outage of one cluster node (tried on the active node again), which say the operator must fix
something (``backend_misconfigured``), and how each reads. Messages never contain tokens, secret ids or Vault's
response bodies.
"""

from __future__ import annotations

import hvac
import hvac.exceptions
import requests

from keybroker.backends.vault.cluster import NoActiveNode
from keybroker.errors import BackendUnavailable

# "Not now" rather than "not like this": retried later, reported as backend_unavailable.
OUTAGES: tuple[type[Exception], ...] = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.PreconditionFailed,
    hvac.exceptions.UnexpectedError,
    requests.RequestException,
)
# An outage of the node that answered, which another node of the cluster may not have: with ``addresses`` the
# operation is sent again to the active node, found anew. Sealed or a standby that lost its leader (503), not
# initialised (501: a node still joining), "local node not active but active cluster node not found" (500), a
# proxy in front of a dead node (502), a consistency wait (412), refused, reset or timed out (a standby's 307 to
# the dead leader ends as refused too: requests follows it), an answer cut off in its body (ChunkedEncodingError,
# whatever the encoding). Not TLS that does not verify (an SSLError is a ConnectionError) and not rate limiting
# (429: the quota is the cluster's): those are reported at once.
NODE_DOWN: tuple[type[Exception], ...] = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.PreconditionFailed,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
NOT_NODE_DOWN: tuple[type[Exception], ...] = (requests.exceptions.SSLError,)
# Vault refused the token: by policy, or because the token itself is no longer valid (Vault answers both with 403).
REFUSED: tuple[type[Exception], ...] = (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)
MISCONFIGURED = "backend_misconfigured"


def nothing_stored(exc: hvac.exceptions.InvalidPath) -> bool:
    """Whether a 404 means "no secret at this path" (``{"errors": []}``, or a KV v2 version that was deleted, which
    answers with its metadata) rather than a path Vault has no route for: a mount that does not exist ("no handler
    for route"), an engine that does not serve it ("unsupported path"), a KV v1 request to a KV v2 mount. Those are
    misconfigurations and must not read as a missing key."""
    if exc.errors:
        return False
    if exc.errors == []:
        return True
    body = exc.json if isinstance(exc.json, dict) else {}
    return isinstance(body.get("data"), dict)


def node_down(exc: Exception) -> bool:
    return isinstance(exc, NODE_DOWN) and not isinstance(exc, NOT_NODE_DOWN)


def translate(url: str, what: str, exc: BaseException) -> BackendUnavailable:
    """An hvac or requests error that the operation did not handle, without Vault's response body."""
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return BackendUnavailable(
            f"Vault at {url} has no route for {what}: check that the mount exists and is the configured engine "
            "(and KV version)",
            code=MISCONFIGURED,
        )
    if isinstance(exc, hvac.exceptions.InvalidRequest | hvac.exceptions.UnsupportedOperation):
        return BackendUnavailable(
            f"Vault at {url} rejected {what} as invalid: check the mount, its engine and KV version",
            code=MISCONFIGURED,
        )
    if isinstance(exc, REFUSED):
        return forbidden(url, what)
    return unavailable(url, exc)


# How an outage reads, by hvac exception (anything else: "failed (<exception name>)", never Vault's body).
_STATES: tuple[tuple[type[Exception], str], ...] = (
    (hvac.exceptions.VaultDown, "is sealed or down"),
    (hvac.exceptions.VaultNotInitialized, "is not initialised"),
    (hvac.exceptions.RateLimitExceeded, "is rate-limiting keybroker"),
    (requests.Timeout, "did not answer in time"),
)


def unavailable(url: str, exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, requests.exceptions.SSLError):
        return BackendUnavailable(
            f"TLS with Vault at {url} failed: its certificate did not verify (set ca_file to the CA that issued it)",
            code=MISCONFIGURED,
        )
    if isinstance(exc, NoActiveNode):
        last = "" if exc.last is None else f"; last error: {_state(exc.last)}"
        return BackendUnavailable(f"Vault cluster: {exc.describe()}{last}")
    return BackendUnavailable(f"Vault at {url} {_state(exc)}")


def _state(exc: BaseException) -> str:
    state = next((text for kind, text in _STATES if isinstance(exc, kind)), None)
    if state is None:
        state = "cannot be reached" if isinstance(exc, requests.RequestException) else f"failed ({type(exc).__name__})"
    return state


def forbidden(url: str, what: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Vault at {url} denied keybroker {what} although its token is valid: grant that in keybroker's Vault "
        "policy (or check the mount)",
        code=MISCONFIGURED,
    )


def token_invalid(url: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"Vault at {url} refused keybroker's token: it is invalid or expired (put a valid token in its source)",
        code=MISCONFIGURED,
    )
