"""Prometheus metrics, in a registry per application (no process-global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keybroker_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self.latency = Histogram(
            "keybroker_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.key_operations = Counter(
            "keybroker_key_operations",
            "Key operations by kind and outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.transfer_decisions = Counter(
            "keybroker_transfer_decisions",
            "Key transfer decisions by outcome",
            ["outcome"],
            registry=self.registry,
        )

    def request_done(self, method: str, route: str, status: int, elapsed: float) -> None:
        """Count a finished request and its latency (the labelled children remembered: ``labels`` costs more than
        the increment itself)."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            if len(self._children) < 10_000:  # routes are templates and statuses few; bounded all the same
                self._children[key] = children
        children[0].inc()
        children[1].observe(elapsed)
