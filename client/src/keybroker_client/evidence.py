"""Evidence providers: how a workload gets a DCAP quote over 64 bytes of report data.

Three implementations, selected by configuration:

- ``SimulatedEvidence(directory, "sgx", mrenclave="ab" * 32)``: the simulated TEE of ``keybroker sim init``
  (development and CI; accepted only by a keybroker configured with the simulated root). Measurements are hex
  strings or bytes; every argument, the directory and its files are checked at construction
  (``ConfigurationError`` with the reason).
- ``TdxEvidence()``: a TDX guest through Linux configfs-tsm (kernel 6.7+). Needs configfs mounted at
  ``/sys/kernel/config`` and write access to ``/sys/kernel/config/tsm/report`` (root, or a group granted it); the
  provider file must read ``tdx_guest``.
- ``GramineSgxEvidence()``: an SGX enclave under Gramine with remote attestation enabled
  (``sgx.remote_attestation = "dcap"``): writes ``/dev/attestation/user_report_data`` (64 bytes), reads
  ``/dev/attestation/quote``. Both paths exist only inside the enclave.

``from_spec("auto")`` (the workload CLI's default) picks ``TdxEvidence`` when configfs-tsm's report directory
exists, else ``GramineSgxEvidence`` when ``/dev/attestation`` exists, else raises ``NoTeeError``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any, Protocol

from keybroker_client._errors import ConfigurationError, EvidenceError
from keybroker_client._values import report_data as checked_report_data


class NoTeeError(EvidenceError):
    """``auto``: neither a TDX guest (configfs-tsm) nor a Gramine SGX enclave here."""


TSM_REPORT = Path("/sys/kernel/config/tsm/report")  # configfs-tsm (Linux 6.7+), as TdxEvidence uses it
GRAMINE_ATTESTATION = Path("/dev/attestation")  # Gramine's pseudo-filesystem, inside an SGX enclave


class EvidenceProvider(Protocol):
    tee_type: str  # "SGX" or "TDX"

    def quote(self, report_data: bytes) -> bytes:
        """A DCAP quote whose REPORTDATA is ``report_data`` (exactly 64 bytes)."""
        ...


_VERSIONS = {"SGX": (3,), "TDX": (4, 5)}


def _path(name: str, value: object) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigurationError(f"{name} is a path, not {value!r}")
    return Path(value)


class SimulatedEvidence:
    """Quotes from a simulated platform (``keybroker sim init DIR``): ``SimulatedEvidence("sim", "sgx",
    mrenclave="ab" * 32)``. ``measurements`` are the fields of ``sim_quotes.SgxMeasurements`` (``mrenclave``,
    ``mrsigner``, ``isvprodid``, ``isvsvn``, ``config_id``, ``config_svn``, ``debug``, ``attributes``) or
    ``TdxMeasurements`` (``mrtd``, ``rtmrs``, ``mrconfigid``, ``mrowner``, ``mrownerconfig``, ``td_attributes``,
    ``xfam``, ``mrseam``, ``debug``); byte fields as hex strings or bytes.

    Everything is checked here, before any quote: the TEE, each measurement (name, hex, length), ``version``
    (SGX 3; TDX 4 or 5), ``td_report_15`` (TDX version 5 only), the directory and the platform's files. A wrong
    one is a ``ConfigurationError`` (a ``ValueError``) with its reason."""

    def __init__(
        self,
        directory: str | Path,
        tee: str = "sgx",
        *,
        platform: str = "default",
        version: int | None = None,
        td_report_15: bool = False,
        **measurements: object,
    ) -> None:
        from keybroker_client.sim_platform import load_platform
        from keybroker_client.sim_quotes import SgxMeasurements, TdxMeasurements
        from keybroker_client.sim_quotes import measurements as parse

        if not isinstance(tee, str) or tee.upper() not in _VERSIONS:
            raise ConfigurationError(f"tee is 'sgx' or 'tdx', not {tee!r}")
        self.tee_type = tee.upper()
        allowed = _VERSIONS[self.tee_type]
        if version is not None and (isinstance(version, bool) or version not in allowed):
            versions = " or ".join(str(v) for v in allowed)
            raise ConfigurationError(f"version: {self.tee_type} quotes are version {versions}, not {version!r}")
        if not isinstance(td_report_15, bool):
            raise ConfigurationError(f"td_report_15 is True or False, not {td_report_15!r}")
        if td_report_15 and (self.tee_type != "TDX" or version != 5):
            raise ConfigurationError("td_report_15 is for TDX quotes of version 5: give tee='tdx', version=5")
        parsed = parse(self.tee_type, measurements)
        self._sgx = parsed if isinstance(parsed, SgxMeasurements) else None
        self._tdx = parsed if isinstance(parsed, TdxMeasurements) else None
        self._platform = load_platform(_path("directory", directory), platform)
        self._version = version
        self._td_report_15 = td_report_15

    def quote(self, report_data: bytes | str) -> bytes:
        """A quote over ``report_data``: 64 bytes, or 128 hex digits."""
        from keybroker_client.sim_quotes import build_quote

        return build_quote(
            self._platform,
            checked_report_data(report_data),
            sgx=self._sgx,
            tdx=self._tdx,
            version=self._version,
            td_report_15=self._td_report_15,
        )


_ENTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one configfs directory name


class TdxEvidence:
    """Quotes of this TDX guest through configfs-tsm: ``TdxEvidence()``. Each quote is a new report entry under
    ``tsm_root`` (created, used, removed); ``EvidenceError`` if configfs-tsm is not there or not usable."""

    tee_type = "TDX"

    def __init__(self, tsm_root: str | Path = TSM_REPORT, entry_name: str | None = None) -> None:
        self._root = _path("tsm_root", tsm_root)
        if entry_name is not None and (not isinstance(entry_name, str) or not _ENTRY.fullmatch(entry_name)):
            raise ConfigurationError(f"entry_name {entry_name!r} is not one directory name")
        self._entry_name = entry_name  # tests lay out a fake entry beforehand; the kernel creates its files itself

    def quote(self, report_data: bytes | str) -> bytes:
        """A TD quote over ``report_data``: 64 bytes, or 128 hex digits."""
        report_data = checked_report_data(report_data)
        entry = self._root / (self._entry_name or f"keybroker-{secrets.token_hex(8)}")
        try:
            entry.mkdir(exist_ok=self._entry_name is not None)
        except OSError as exc:
            raise EvidenceError(f"cannot create a configfs-tsm report under {self._root}: {exc.strerror}") from None
        try:
            provider = (entry / "provider").read_text().strip() if (entry / "provider").exists() else "tdx_guest"
            if provider != "tdx_guest":
                raise EvidenceError(f"the configfs-tsm provider is {provider!r}, not tdx_guest")
            has_generation = (entry / "generation").exists()
            generation = _read_int(entry / "generation")
            (entry / "inblob").write_bytes(report_data)
            try:
                quote = (entry / "outblob").read_bytes()
            except OSError as exc:
                raise EvidenceError(f"configfs-tsm gave no quote: {exc.strerror}") from None
            # Another writer between our write and read bumps the generation: the quote is not ours then.
            if has_generation and _read_int(entry / "generation") != generation + 1:
                raise EvidenceError("the configfs-tsm report changed while it was read; try again")
            if not quote:
                raise EvidenceError("configfs-tsm returned an empty quote")
            return quote
        finally:
            with contextlib.suppress(OSError):
                entry.rmdir()


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        raise EvidenceError(f"{path} does not hold a number") from None


class GramineSgxEvidence:
    """Quotes of this SGX enclave under Gramine (``sgx.remote_attestation = "dcap"``): ``GramineSgxEvidence()``.
    ``EvidenceError`` outside an enclave, or without remote attestation."""

    tee_type = "SGX"

    def __init__(self, attestation_dir: str | Path = GRAMINE_ATTESTATION) -> None:
        self._dir = _path("attestation_dir", attestation_dir)

    def quote(self, report_data: bytes | str) -> bytes:
        """An SGX quote over ``report_data``: 64 bytes, or 128 hex digits."""
        report_data = checked_report_data(report_data)
        try:
            with open(self._dir / "user_report_data", "wb") as handle:
                handle.write(report_data)
            quote = (self._dir / "quote").read_bytes()
        except OSError as exc:
            raise EvidenceError(f"Gramine's {self._dir} is not usable (outside an enclave?): {exc.strerror}") from None
        if not quote:
            raise EvidenceError("Gramine returned an empty quote")
        return quote


_HEX_FIELDS = frozenset({"mrenclave", "mrsigner", "config_id", "mrtd", "mrconfigid", "mrowner", "mrownerconfig"})
_INT_FIELDS = frozenset({"isvprodid", "isvsvn", "config_svn"})
_RTMRS = ("rtmr0", "rtmr1", "rtmr2", "rtmr3")


def _sim_fields(fields: str) -> tuple[str, dict[str, Any]]:
    """The ``FIELD=VALUE,...`` part of a ``sim:`` spec: the platform and the measurements."""
    measurements: dict[str, Any] = {}
    rtmrs: dict[int, str] = {}
    platform = "default"
    for item in filter(None, fields.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigurationError(f"evidence field {item!r} is not NAME=VALUE")
        if name == "platform":
            platform = value
        elif name in _HEX_FIELDS:
            if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", value):
                raise ConfigurationError(f"evidence field {name} must be hex")
            measurements[name] = value  # its length is checked with the other measurements
        elif name in _RTMRS:
            if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", value):
                raise ConfigurationError(f"evidence field {name} must be hex")
            rtmrs[_RTMRS.index(name)] = value
        elif name in _INT_FIELDS:
            if not value.isdigit():
                raise ConfigurationError(f"evidence field {name} must be a decimal integer")
            measurements[name] = int(value)
        else:
            raise ConfigurationError(f"unknown evidence field {name!r}")
    if rtmrs:
        measurements["rtmrs"] = tuple(rtmrs.get(i, "00" * 48) for i in range(4))
    return platform, measurements


def auto_evidence() -> EvidenceProvider:
    """The TEE this process runs in: a TDX guest if configfs-tsm's report directory (``TSM_REPORT``) exists, else a
    Gramine SGX enclave if ``GRAMINE_ATTESTATION`` exists; ``NoTeeError`` when neither does."""
    if TSM_REPORT.is_dir():
        return TdxEvidence(TSM_REPORT)
    if GRAMINE_ATTESTATION.is_dir():
        return GramineSgxEvidence(GRAMINE_ATTESTATION)
    raise NoTeeError(
        f"--evidence auto found no TEE: neither a TDX guest (configfs-tsm, {TSM_REPORT}: Linux 6.7+ with configfs "
        f"mounted) nor a Gramine SGX enclave ({GRAMINE_ATTESTATION}); give --evidence tdx, sgx-gramine or "
        "sim:DIR[:sgx|tdx] (a simulated TEE, for development)"
    )


def from_spec(spec: str) -> EvidenceProvider:
    """``auto``, ``sim:DIR[:sgx|tdx][:FIELD=VALUE,...]``, ``tdx`` or ``sgx-gramine`` (the workload CLI's
    ``--evidence``). ``auto`` is ``auto_evidence()``: TDX, else Gramine SGX, else ``NoTeeError``. A wrong spec
    is a ``ConfigurationError`` (a ``ValueError``) saying why.

    A simulated workload has all-zero measurements unless given: hex for ``mrenclave``, ``mrsigner``,
    ``config_id``, ``mrtd``, ``rtmr0`` to ``rtmr3``, ``mrconfigid``, ``mrowner``, ``mrownerconfig``; integers for
    ``isvprodid``, ``isvsvn``, ``config_svn``; ``platform=NAME`` picks a simulated platform other than ``default``.
    """
    if spec.startswith("sim:"):
        directory, _, rest = spec[4:].partition(":")
        if not directory:
            raise ConfigurationError("sim: needs the simulated TEE's directory: sim:DIR[:sgx|tdx][:FIELD=VALUE,...]")
        tee, _, fields = rest.partition(":")
        if "=" in tee:  # sim:DIR:FIELD=VALUE (the TEE left out)
            tee, fields = "", rest
        platform, measurements = _sim_fields(fields)
        return SimulatedEvidence(directory, tee or "sgx", platform=platform, **measurements)
    if spec == "auto":
        return auto_evidence()
    if spec == "tdx":
        return TdxEvidence(TSM_REPORT)
    if spec == "sgx-gramine":
        return GramineSgxEvidence(GRAMINE_ATTESTATION)
    raise ConfigurationError(
        f"unknown evidence {spec!r}: use auto, sim:DIR[:sgx|tdx][:FIELD=VALUE,...], tdx or sgx-gramine"
    )


__all__ = [
    "GRAMINE_ATTESTATION",
    "TSM_REPORT",
    "EvidenceError",
    "EvidenceProvider",
    "GramineSgxEvidence",
    "NoTeeError",
    "SimulatedEvidence",
    "TdxEvidence",
    "auto_evidence",
    "from_spec",
]
