"""Prometheus metrics, in a registry per application (no process-global state)."""

from __future__ import annotations

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
