"""Collateral from an upstream: Intel PCS v4 or any PCCS, over httpx, with timeouts, retries and one request in
flight per item. Everything fetched is checked (signatures, chain to a trusted root) before it is stored."""

from __future__ import annotations

import binascii
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from urllib.parse import unquote

import httpx
import structlog

from keybroker.attestation.collateral import CollateralItem, item_from_pcs
from keybroker.attestation.quote import Quote
from keybroker.attestation.store import CollateralStore
from keybroker.errors import CollateralInvalid, CollateralUnavailable

log = structlog.get_logger("keybroker.collateral")
_CHAIN_HEADERS = {
    "tcb": "TCB-Info-Issuer-Chain",
    "qe": "SGX-Enclave-Identity-Issuer-Chain",
    "pckcrl": "SGX-PCK-CRL-Issuer-Chain",
}


def request_for(key: str) -> tuple[str, dict[str, str]]:
    """The PCS v4 path and query of an item key."""
    kind, _, rest = key.partition(":")
    if kind == "tcb":
        tee, fmspc = rest.split(":")
        return f"/{tee.lower()}/certification/v4/tcb", {"fmspc": fmspc}
    if kind == "qe":
        return f"/{rest.lower()}/certification/v4/qe/identity", {}
    if kind == "pckcrl":
        return "/sgx/certification/v4/pckcrl", {"ca": rest, "encoding": "der"}
    return "/sgx/certification/v4/rootcacrl", {}


class PcsClient:
    def __init__(
        self,
        base_url: str,
        roots: Sequence[bytes],
        store: CollateralStore,
        timeout: float,
        api_key: str | None = None,
        verify: object = True,
        attempts: int = 3,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._roots = list(roots)
        self._store = store
        self._attempts = attempts
        headers = {"Ocp-Apim-Subscription-Key": api_key} if api_key else {}
        # verify is True or an SSLContext (typed object by the caller that builds it).
        self._http = httpx.Client(timeout=timeout, headers=headers, verify=verify)  # type: ignore[arg-type]
        self._locks = [threading.Lock() for _ in range(32)]  # striped: bounded, whatever keys are asked for

    def __repr__(self) -> str:
        return f"PcsClient({self._base!r})"

    def close(self) -> None:
        self._http.close()

    def fetch(self, key: str) -> CollateralItem:
        """Fetch, check and store one item. Concurrent calls for one key share a single request."""
        with self._locks[hash(key) % len(self._locks)]:
            path, params = request_for(key)
            response = self._get(path, params)
            body = response.content
            if key == "rootcacrl" and body[:1] != b"\x30":  # PCCS serves the root CA CRL as hex text
                try:
                    body = binascii.unhexlify(body.strip())
                except (binascii.Error, ValueError):
                    raise CollateralUnavailable(f"{key}: the upstream's answer is neither DER nor hex") from None
            chain = unquote(response.headers.get(_CHAIN_HEADERS.get(key.split(":", maxsplit=1)[0], ""), ""))
            try:
                item = item_from_pcs(key, body, chain, self._roots)
            except CollateralInvalid as exc:
                raise CollateralUnavailable(f"{key}: the upstream's collateral was refused: {exc.detail}") from None
            self._store.put([item], source=self._base)
            return item

    def fetch_missing(self, _quote: Quote, keys: list[str]) -> None:
        for key in keys:
            self.fetch(key)

    def _get(self, path: str, params: dict[str, str]) -> httpx.Response:
        last = "no attempt"
        for attempt in range(self._attempts):
            try:
                response = self._http.get(self._base + path, params=params)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    return response
                last = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code != 429:
                    break  # a 404 will not change by asking again
            time.sleep(min(2.0, 0.2 * 2**attempt))
        log.warning("collateral_upstream_failed", upstream=self._base, path=path, last=last)
        raise CollateralUnavailable(f"the collateral upstream did not provide {path.rsplit('/', 1)[-1]} ({last})")


def refresh_due(client: PcsClient, store: CollateralStore, now: datetime, before: timedelta) -> list[str]:
    """Fetch every cached item whose newest version expires within ``before``; returns the keys fetched. Failures
    are left for the next round (the cached version stays usable until its own nextUpdate)."""
    fetched = []
    for key in store.item_keys():
        newest = store.newest(key)
        if newest is not None and newest.next_update - now <= before:
            try:
                client.fetch(key)
                fetched.append(key)
            except CollateralUnavailable:
                continue
    return fetched
