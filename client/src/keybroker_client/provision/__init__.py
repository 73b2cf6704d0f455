"""The workload agent of the Nginx flow (its contract is in ``command``)."""

from keybroker_client.provision.command import (
    FAILED,
    OK,
    USAGE,
    KeysFileError,
    ProvisionError,
    parse_keys_file,
    provision,
)

__all__ = ["FAILED", "OK", "USAGE", "KeysFileError", "ProvisionError", "parse_keys_file", "provision"]
