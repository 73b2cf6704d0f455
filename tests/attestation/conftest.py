"""Real Intel quotes and collateral (tests/data/dcap/real, see its README and each PROVENANCE.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keybroker.attestation.collateral import CollateralItem, read_bundle
from keybroker.attestation.store import MemoryCollateral
from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der

REAL = Path(__file__).resolve().parent.parent / "data" / "dcap" / "real"


@dataclass(frozen=True)
class RealQuote:
    name: str
    folder: Path
    quote: bytes
    expected: dict[str, Any]

    @property
    def now(self) -> datetime:
        return datetime.fromtimestamp(self.expected["now"], UTC)

    @property
    def positive(self) -> bool:
        return not self.name.startswith("neg-")


def real_quotes() -> list[RealQuote]:
    return [
        RealQuote(d.name, d, (d / "quote.bin").read_bytes(), json.loads((d / "expected.json").read_text()))
        for d in sorted(REAL.iterdir())
        if d.is_dir()
    ]


POSITIVE = [q for q in real_quotes() if q.positive]


@pytest.fixture(scope="session")
def anchors() -> TrustAnchors:
    return TrustAnchors(intel_root_der())


@pytest.fixture(scope="session")
def real_items(anchors: TrustAnchors) -> list[CollateralItem]:
    return [item for q in real_quotes() for item in read_bundle(q.folder, anchors.roots())]


@pytest.fixture(scope="session")
def verifier(anchors: TrustAnchors, real_items: list[CollateralItem]) -> QuoteVerifier:
    return QuoteVerifier(MemoryCollateral(real_items), anchors)
