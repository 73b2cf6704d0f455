"""Checking every configured backend at once: what ``GET /kbs/v1/backends`` answers (and ``keybroker backends check
--offline`` prints). Each answer is the backend's name, its type, the KEK holder of an embedded one, whether it is
the default, ok or the error's code and sentence (as client-safe as a problem+json's), and how long it took."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from keybroker.backends.base import KeyStore
from keybroker.config import Settings
from keybroker.errors import KeybrokerError

log = structlog.get_logger("keybroker.backends")


def check_backends(stores: Mapping[str, KeyStore], settings: Settings) -> list[dict[str, Any]]:
    """Run ``check()`` of every store in parallel (a slow or unreachable KMS delays only its own answer) and report
    each, in the configuration's order."""
    with ThreadPoolExecutor(max_workers=max(1, len(stores)), thread_name_prefix="backend-check") as pool:
        results = list(pool.map(check_store, stores.values()))
    report = []
    for (name, store), (failure, seconds) in zip(stores.items(), results, strict=True):
        configured = settings.backends.get(name)
        wrapper = getattr(configured, "wrapper", None)
        entry: dict[str, Any] = {
            "name": name,
            "type": configured.type if configured is not None else type(store).__name__,
            "kek": wrapper.type if wrapper is not None else None,
            "default": name == settings.keys.default_backend,
            "ok": failure is None,
            "seconds": round(seconds, 3),
        }
        if failure is not None:
            entry["code"], entry["detail"] = failure
        report.append(entry)
    return report


def check_store(store: KeyStore) -> tuple[tuple[str, str] | None, float]:
    """(None, or the error's code and detail; seconds taken). An exception that is not keybroker's is a bug of the
    backend: logged with its traceback, reported without its text (it could hold anything)."""
    started = time.monotonic()
    try:
        store.check()
        failure = None
    except KeybrokerError as exc:
        failure = (exc.instance_code, exc.detail)
    except Exception:
        log.exception("backend_check_failed", backend=store.name)
        failure = ("check_failed", "the check failed unexpectedly; the server's log has the details")
    return failure, time.monotonic() - started
