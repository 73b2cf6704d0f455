"""Server workers may create the workload CA at the same moment: the key and certificate on disk always match."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from keybroker.backends.local_kek import LocalKeyWrapper
from keybroker.ca import ServiceCA

MASTER = b"m" * 32


def _create(directory: str) -> None:
    ServiceCA.workload(Path(directory), LocalKeyWrapper(MASTER)).create(datetime.now(UTC), "keybroker workload CA")


def test_concurrent_creation_leaves_one_consistent_ca(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(3):
        directory = tmp_path / f"data{attempt}"
        workers = [context.Process(target=_create, args=(str(directory),)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        ca = ServiceCA.workload(directory, LocalKeyWrapper(MASTER))
        cert, key = ca._load()
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == key.public_key().public_bytes(
            serialization.Encoding.DER, spki
        )
