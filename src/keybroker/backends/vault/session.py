"""The authenticated Vault / OpenBao session that the KV store (``store``) and the Transit ``KeyWrapper``
(``transit.py``) share; ``failures`` is the one table that turns hvac's exceptions into keybroker's errors.

Token lifetime: the token is renewed once two thirds of its TTL have passed, on the next request, on /readyz and
from the server's background task (``renew_if_due``). A renewal that fails because Vault is sealed, down or
overloaded is retried ``RETRY_AFTER`` later. Vault refusing the renewal ends it for a static token (not renewable,
or at its max TTL); AppRole logs in again and revokes the token it replaces. A token that Vault no longer accepts
(expired, revoked) is replaced: AppRole logs in again, a static token is read again from its source (it may have
been rotated there).

Failures: an unreachable, sealed, standby-only or rate-limiting Vault is ``BackendUnavailable`` (503
``backend_unavailable``). Code ``backend_misconfigured`` (also 503) says the operator must fix something: a policy
that denies a path (named, with the capability) while keybroker's token is valid, a token that is invalid or
expired, refused AppRole credentials, a mount that does not exist (Vault has no route for the path), TLS that does
not verify. Messages never contain tokens, secret ids or Vault's response bodies.

A cluster (``addresses``): every request goes to the active node, and an outage of one node (``NODE_DOWN``) sends
the operation to the active node found anew, for at most ``failover_seconds`` (``cluster.py``). The token is the
cluster's (raft replicates it), so one login serves every node and a renewal on one holds on all. Without
``addresses``, ``url`` is used as before: an outage is reported at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

import hvac
import hvac.exceptions
import requests
import requests.adapters

from keybroker.backends.vault.cluster import Cluster, NoActiveNode
from keybroker.backends.vault.failures import (
    MISCONFIGURED,
    OUTAGES,
    REFUSED,
    forbidden,
    node_down,
    token_invalid,
    translate,
    unavailable,
)
from keybroker.clock import Clock
from keybroker.config import SecretReader, VaultConnectionSettings
from keybroker.errors import BackendUnavailable, ConfigurationError

T = TypeVar("T")

# Renew the token once two thirds of its lifetime have passed.
_RENEW_AT = 2 / 3
# A renewal or login that found Vault sealed, down or overloaded is tried again this much later.
RETRY_AFTER = timedelta(seconds=30)


class _Denied(Exception):
    """An operation was refused with 403/401; ``VaultSession.call`` finds out whether the token or the policy is why."""


class VaultSession:
    """An authenticated hvac client, renewed in time.

    Threads: every method may be called from any number of threads at once. hvac's client and its requests
    session are shared (requests' connection pool is thread-safe); login, renewal and token replacement run under
    one lock, so one thread does them while the others wait (a renewal during a failover waits at most the budget).
    Which cluster node is active is ``Cluster``'s, under its own lock, which never waits for this one, so the two
    cannot deadlock; the node is switched by setting the shared client's URL, and a request already under way
    finishes where it was sent. A token replaced while another thread's request is under way lets that request
    fail as refused once, and ``call`` then retries it with the new token.

    ``sleep`` and ``monotonic`` time the failover budget and the backoff between probes (real time, not the
    ``clock`` of token lifetimes, which tests pin); ``transport`` replaces the HTTP transport (tests)."""

    def __init__(
        self,
        secrets: SecretReader,
        config: VaultConnectionSettings,
        clock: Clock,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        transport: requests.adapters.BaseAdapter | None = None,
    ) -> None:
        self.url = config.url
        self._config = config
        self._secrets = secrets
        self._clock = clock
        self._lock = threading.Lock()
        self._verify: str | bool = str(secrets.resolve(config.ca_file)) if config.ca_file else True
        self._transport = transport
        self._client = self._new_client(config.url)
        nodes = config.nodes
        self._cluster = (
            None
            if nodes is None
            else Cluster(
                nodes,
                self._client.session,
                self._switch,
                verify=self._verify,
                timeout=config.timeout_seconds,
                budget=config.failover_seconds,
                sleep=sleep,
                monotonic=monotonic,
            )
        )
        self._renew_after: datetime | None = None  # when the token is next renewed or replaced; None: never
        self._relogin = False  # AppRole: what is due then is a new login (the token cannot be renewed any more)
        self._issued_ttl = 0  # the token's lifetime as issued; a renewal giving far less is capped by its max TTL
        self._logged_in = False
        # Credentials are read now, so that a missing token file stops the start; an unreachable or sealed Vault
        # does not: keybroker starts, reports the backend unavailable (/readyz, 503s) and logs in once it is back.
        self._credentials()
        with contextlib.suppress(BackendUnavailable):
            self._login(budget=0.0)  # one look for the active node, no waiting: the start is not held up

    def __repr__(self) -> str:
        nodes = "" if self._cluster is None else f", nodes={len(self._cluster.nodes)}"
        return f"VaultSession(url={self.url!r}{nodes}, auth={self._config.auth.method!r})"

    @property
    def _here(self) -> str:
        """The node requests go to (``url`` without a cluster), for messages."""
        return str(self._client.url)

    def _new_client(self, url: str, token: str | None = None) -> hvac.Client:
        config = self._config
        client = hvac.Client(
            url=url, token=token, verify=self._verify, timeout=config.timeout_seconds, namespace=config.namespace
        )
        if self._transport is not None:
            client.session.mount("http://", self._transport)
            client.session.mount("https://", self._transport)
        return client

    def _switch(self, node: str) -> None:
        self._client.url = node

    def _send(self, request: Callable[[hvac.Client], T], budget: float | None = None) -> T:
        """``request`` with the client; in a cluster on the active node, and after an outage of the node
        (``node_down``) again on the active node found anew, until the failover budget is spent (then
        ``NoActiveNode``). Other errors, and every error without a cluster, are raised as they are."""
        if self._cluster is None:
            return request(self._client)
        return self._cluster.run(lambda: request(self._client), node_down, budget)

    def _credentials(self) -> str:
        auth = self._config.auth
        if auth.method == "token":
            assert auth.token is not None
            return self._secrets.read(auth.token, "Vault token")
        assert auth.secret_id is not None
        return self._secrets.read(auth.secret_id, "Vault AppRole secret id")

    def _credentials_now(self) -> str:
        """The credential, read at request time: a file that became unreadable is a misconfiguration, not a crash."""
        try:
            return self._credentials()
        except ConfigurationError as exc:
            raise BackendUnavailable(exc.detail, code=MISCONFIGURED) from None

    def _ensure_login(self) -> None:
        if not self._logged_in:
            with self._lock:
                if not self._logged_in:
                    self._login()

    def _login(self, secret: str | None = None, budget: float | None = None) -> None:
        """Log in with AppRole, or take the token from its source (read again: it may have been rotated there).
        The caller holds the lock (or is the constructor). Credentials Vault refuses leave the session logged out,
        so that the next request reads them again; an outage leaves it as it was."""
        auth = self._config.auth
        secret = secret if secret is not None else self._credentials_now()
        try:
            if auth.method == "token":
                self._client.token = secret
                data = self._send(lambda client: client.auth.token.lookup_self(), budget)["data"]
                ttl = int(data.get("ttl") or 0)
                issued = max(ttl, int(data.get("creation_ttl") or 0), int(data.get("period") or 0))
                renewable = bool(data.get("renewable"))
            else:
                assert auth.role_id is not None
                role_id = auth.role_id
                result = self._send(
                    lambda client: client.auth.approle.login(
                        role_id=role_id, secret_id=secret, mount_point=auth.approle_mount
                    ),
                    budget,
                )
                ttl = issued = int(result["auth"].get("lease_duration") or 0)
                renewable = bool(result["auth"].get("renewable"))
        except (*REFUSED, hvac.exceptions.InvalidRequest):
            self._logged_in = False
            self._renew_after = None
            if auth.method == "token":
                raise token_invalid(self._here) from None
            raise BackendUnavailable(
                f"Vault at {self._here} refused keybroker's AppRole login (check role_id and the secret id)",
                code=MISCONFIGURED,
            ) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            where = "lookup of its token" if auth.method == "token" else f"login on auth/{auth.approle_mount}"
            raise translate(self._here, where, exc) from None
        self._logged_in = True
        self._issued_ttl = issued
        self._relogin = auth.method == "approle" and not renewable
        self._renew_after = self._at(ttl) if ttl and (renewable or auth.method == "approle") else None

    def _at(self, ttl: int) -> datetime:
        return self._clock.now() + timedelta(seconds=ttl * _RENEW_AT)

    def _due(self) -> bool:
        return self._renew_after is not None and self._clock.now() >= self._renew_after

    def _renew_due(self) -> None:
        """Renew or replace the token if that is due. An outage postpones it by ``RETRY_AFTER`` (a request then
        reports the outage itself); credentials Vault refuses raise ``backend_misconfigured``."""
        if not self._due():
            return
        with self._lock:
            if not self._due():
                return
            try:
                self._renew_or_replace(self._client.token)
            except BackendUnavailable as exc:
                if exc.instance_code == MISCONFIGURED:
                    raise
                self._renew_after = self._clock.now() + RETRY_AFTER

    def _renew_or_replace(self, token: str | None) -> None:
        approle = self._config.auth.method == "approle"
        if self._relogin:
            self._login()
            self._revoke(token)
            return
        try:
            result = self._send(lambda client: client.auth.token.renew_self())
        except OUTAGES as exc:
            raise unavailable(self._here, exc) from None
        except hvac.exceptions.VaultError as exc:
            if isinstance(exc, REFUSED) and not self._token_valid():
                self._replace_invalid(token)  # expired or revoked
                return
            # Refused for good (400: "lease is not renewable", a batch token; 403 to a valid token: its policy
            # does not allow renew-self): AppRole logs in again; a static token lives until it expires, and is
            # then read again from its source.
            if approle:
                self._login()
                self._revoke(token)
            else:
                self._renew_after = None
            return
        lease = int((result.get("auth") or {}).get("lease_duration") or 0)
        if lease * 2 < self._issued_ttl or lease <= 0:
            # Capped by the token's max TTL: renewing cannot extend it any more. AppRole logs in again before it
            # ends; a static token is left to expire (then its source is read again).
            self._renew_after = self._at(lease) if approle else None
            self._relogin = approle
        else:
            self._renew_after = self._at(lease)

    def _replace_invalid(self, token: str | None) -> None:
        """Vault no longer accepts ``token``. AppRole logs in again; a static token is read again from its source
        and used if it changed (rotated on disk), else reported as invalid or expired. Caller holds the lock."""
        self._logged_in = False
        if self._config.auth.method == "approle":
            self._login()
            self._revoke(token)
            return
        fresh = self._credentials_now()
        if fresh == token:
            self._renew_after = None
            raise token_invalid(self._here)
        self._login(fresh)

    def _revoke(self, token: str | None) -> None:
        """Best effort: a replaced token is revoked rather than left valid until it expires."""
        if not token or token == self._client.token:
            return
        client = self._new_client(self._here, token)
        try:
            # Already invalid, a batch token, or Vault unreachable: it ends by itself at its TTL.
            with contextlib.suppress(hvac.exceptions.VaultError, requests.RequestException):
                client.auth.token.revoke_self()
        finally:
            client.adapter.close()

    def _recover(self, token: str | None, what: str) -> None:
        """An operation was refused. With a valid token, the policy denies the path: reported, no new login. With
        an invalid one (``lookup_self`` refused too), the token is replaced for one more try."""
        with self._lock:
            if self._client.token != token:
                return  # another thread has replaced the token meanwhile
            if not self._token_valid():
                self._replace_invalid(token)
                return
        raise forbidden(self._here, what)

    def _token_valid(self) -> bool:
        """Whether Vault still accepts the current token (``lookup_self``, allowed by Vault's default policy): a
        refusal by Vault is either the token's fault or the policy's, and only this tells them apart."""
        try:
            self._send(lambda client: client.auth.token.lookup_self())
        except REFUSED:
            return False
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise translate(self._here, "lookup of its token", exc) from None
        return True

    def _attempt(self, what: str, operation: Callable[[hvac.Client], T]) -> T:
        try:
            return self._send(operation)
        except REFUSED:
            raise _Denied from None
        except (hvac.exceptions.VaultError, requests.RequestException) as exc:
            raise translate(self._here, what, exc) from None

    def call(self, what: str, operation: Callable[[hvac.Client], T]) -> T:
        """Run ``operation`` with the authenticated client; ``what`` names the capability and path ("create on
        keybroker/<id>") for error messages. Every hvac error the operation does not handle itself becomes
        ``BackendUnavailable``. A refusal is retried once only if keybroker's token itself turned out invalid
        (it is replaced first); with a valid token it is a policy problem, reported naming ``what``. In a cluster,
        ``operation`` is sent again after an outage of the node (``_send``), so it must be idempotent."""
        self._ensure_login()
        self._renew_due()
        token = self._client.token
        try:
            return self._attempt(what, operation)
        except _Denied:
            pass
        self._recover(token, what)
        try:
            return self._attempt(what, operation)
        except _Denied:
            raise forbidden(self._here, what) from None

    def renew_if_due(self) -> float | None:
        """For the server's background task, so that a quiet instance keeps its token: log in if that has not
        happened yet, renew or replace the token if due. An outage is not raised (it is retried); credentials or
        TLS that Vault refuses raise ``BackendUnavailable`` (``backend_misconfigured``). Returns the seconds until
        something is due again, None when the token never needs renewing."""
        try:
            self._ensure_login()
            self._renew_due()
        except BackendUnavailable as exc:
            if exc.instance_code == MISCONFIGURED:
                raise
            return RETRY_AFTER.total_seconds()
        due = self._renew_after
        return None if due is None else max(0.0, (due - self._clock.now()).total_seconds())

    def health(self) -> None:
        """Raise ``BackendUnavailable`` unless Vault is initialised, unsealed and active (or a usable standby); in a
        cluster, unless a node is active now (probed, without waiting for an election)."""
        if self._cluster is not None:
            try:
                self._cluster.check()
            except NoActiveNode as exc:
                raise unavailable(self._here, exc) from None
            self._ensure_login()
            self._renew_due()
            return
        try:
            response = self._client.adapter.get("/v1/sys/health", params={"standbyok": "true"}, raise_exception=False)
        except requests.RequestException as exc:
            raise unavailable(self.url, exc) from None
        status = getattr(response, "status_code", 200)
        if status != 200:
            state = {501: "not initialised", 503: "sealed", 429: "a standby"}.get(status, f"status {status}")
            raise BackendUnavailable(f"Vault at {self.url} is {state}")
        self._ensure_login()
        self._renew_due()

    def close(self) -> None:
        self._client.adapter.close()
