"""The KMIP backend (the contract is in ``store``)."""

from keybroker.backends.kmip.store import KmipKeyStore

__all__ = ["KmipKeyStore"]
