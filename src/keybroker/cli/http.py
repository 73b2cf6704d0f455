"""The CLI's HTTP side: finds the server like Vault's CLI does (flags, then KEYBROKER_* variables)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import httpx

from keybroker_client import Problem, ProblemError, TransportError, ssl_context

DEFAULT_ADDR = "https://127.0.0.1:9443"


@dataclass(frozen=True)
class Connection:
    addr: str
    token: str | None
    cacert: str | None
    ca_fingerprint: str | None = None

    def client(self) -> httpx.Client:
        verify: Any = True
        if self.addr.startswith("https://"):
            verify = ssl_context(self.addr, self.cacert, self.ca_fingerprint)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.addr.rstrip("/"), headers=headers, verify=verify, timeout=60.0)


class AdminApi:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        try:
            self._client = connection.client()
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot use CA certificate {connection.cacert}: {exc}") from None

    def __enter__(self) -> AdminApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=json, params=params)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach keybroker at {self._connection.addr}: {exc}") from None
        if response.status_code >= 400:
            problem = Problem.from_response(
                response.status_code, response.headers.get("content-type", ""), response.content
            )
            raise ProblemError(problem)
        return response

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def list_all(self, path: str, params: dict[str, Any], fetch_all: bool) -> list[Any]:
        items: list[Any] = []
        query = dict(params)
        while True:
            response = self.request("GET", path, params=query)
            items.extend(response.json())
            cursor = response.headers.get("x-next-cursor")
            if not cursor or not fetch_all:
                return items
            query["cursor"] = cursor
