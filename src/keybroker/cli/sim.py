"""``keybroker sim``: the simulated TEE (development and CI; see dcap-test-pki.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from keybroker.cli import output
from keybroker.cli.common import handled

sim_app = typer.Typer(help="Simulated TEE: a test PKI, quotes and collateral in Intel's formats.", no_args_is_help=True)

Dir = Annotated[Path, typer.Argument(help="The simulator's directory.")]
Hex = Annotated[str | None, typer.Option(show_default=False)]


def _hex(value: str | None, size: int, name: str) -> bytes:
    if value is None:
        return bytes(size)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise typer.BadParameter("not hexadecimal", param_hint=name) from None
    if len(raw) != size:
        raise typer.BadParameter(f"must be {size} bytes ({2 * size} hex digits)", param_hint=name)
    return raw


@sim_app.command("init")
@handled
def init(
    directory: Dir,
    platform: Annotated[str, typer.Option("--platform", help="Platform name.")] = "default",
    fmspc: Annotated[str, typer.Option("--fmspc", help="12 hex digits.")] = "00906ED50000",
    ca: Annotated[str, typer.Option("--ca", help="PCK CA: platform or processor.")] = "platform",
    cpusvn: Annotated[str, typer.Option("--cpusvn", help="32 hex digits.")] = "0a0a0202ff0100000000000000000000",
    pcesvn: Annotated[int, typer.Option("--pcesvn")] = 13,
    tee_tcb_svn: Annotated[
        str, typer.Option("--tee-tcb-svn", help="32 hex digits.")
    ] = "03010200000000000000000000000000",
) -> None:
    """Create the test PKI (once) and a platform (once per name). The trust anchor is DIR/root-ca.pem."""
    from keybroker.sim.pki import PlatformSpec, add_platform, init_pki

    now = datetime.now(UTC)
    pki = init_pki(directory, now)
    _hex(cpusvn, 16, "--cpusvn")
    _hex(tee_tcb_svn, 16, "--tee-tcb-svn")
    add_platform(
        pki,
        PlatformSpec(name=platform, fmspc=fmspc.upper(), ca=ca, cpusvn=cpusvn, pcesvn=pcesvn, tee_tcb_svn=tee_tcb_svn),
        now,
    )
    output.stderr.print(f"simulated TEE in {directory}; trust anchor {directory / 'root-ca.pem'}", highlight=False)


@sim_app.command("quote")
@handled
def quote(
    directory: Dir,
    out: Annotated[Path, typer.Option("--out", help="Where to write the quote.")],
    tee: Annotated[str, typer.Option("--tee", help="sgx or tdx.")] = "sgx",
    version: Annotated[int | None, typer.Option("--version", help="3 (SGX); 4 or 5 (TDX).")] = None,
    td_report_15: Annotated[bool, typer.Option("--td-report-15", help="v5: TD report 1.5.")] = False,
    report_data: Hex = None,
    mrenclave: Hex = None,
    mrsigner: Hex = None,
    isvprodid: Annotated[int, typer.Option("--isvprodid")] = 0,
    isvsvn: Annotated[int, typer.Option("--isvsvn")] = 0,
    config_id: Hex = None,
    config_svn: Annotated[int, typer.Option("--config-svn")] = 0,
    mrtd: Hex = None,
    rtmr0: Hex = None,
    rtmr1: Hex = None,
    rtmr2: Hex = None,
    rtmr3: Hex = None,
    mrconfigid: Hex = None,
    mrowner: Hex = None,
    td_attributes: Hex = None,
    xfam: Hex = None,
    debug: Annotated[bool, typer.Option("--debug", help="A debug enclave / TD (always refused).")] = False,
    wrong_key: Annotated[bool, typer.Option("--wrong-key", help="Sign with another key (negative test).")] = False,
    platform: Annotated[str, typer.Option("--platform")] = "default",
) -> None:
    """Produce a quote over REPORT_DATA (64 bytes of hex) with the given measurements."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from keybroker_client.sim_platform import load_platform
    from keybroker_client.sim_quotes import (
        TD_ATTRIBUTES_DEFAULT,
        XFAM_DEFAULT,
        SgxMeasurements,
        TdxMeasurements,
        build_quote,
    )

    loaded = load_platform(directory, platform)
    data = _hex(report_data, 64, "--report-data")
    if tee == "sgx":
        sgx = SgxMeasurements(
            mrenclave=_hex(mrenclave, 32, "--mrenclave"),
            mrsigner=_hex(mrsigner, 32, "--mrsigner"),
            isvprodid=isvprodid,
            isvsvn=isvsvn,
            config_id=_hex(config_id, 64, "--config-id"),
            config_svn=config_svn,
            debug=debug,
        )
        tdx = None
    elif tee == "tdx":
        sgx = None
        tdx = TdxMeasurements(
            mrtd=_hex(mrtd, 48, "--mrtd"),
            rtmrs=(
                _hex(rtmr0, 48, "--rtmr0"),
                _hex(rtmr1, 48, "--rtmr1"),
                _hex(rtmr2, 48, "--rtmr2"),
                _hex(rtmr3, 48, "--rtmr3"),
            ),
            mrconfigid=_hex(mrconfigid, 48, "--mrconfigid"),
            mrowner=_hex(mrowner, 48, "--mrowner"),
            td_attributes=_hex(td_attributes, 8, "--td-attributes") if td_attributes else TD_ATTRIBUTES_DEFAULT,
            xfam=_hex(xfam, 8, "--xfam") if xfam else XFAM_DEFAULT,
            debug=debug,
        )
    else:
        raise typer.BadParameter("sgx or tdx", param_hint="--tee")
    try:
        raw = build_quote(
            loaded,
            data,
            sgx=sgx,
            tdx=tdx,
            version=version,
            td_report_15=td_report_15,
            signing_key=ec.generate_private_key(ec.SECP256R1()) if wrong_key else None,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--version") from None
    out.write_bytes(raw)
    output.stderr.print(f"wrote a {tee.upper()} quote ({len(raw)} bytes) to {out}", highlight=False)


@sim_app.command("collateral")
@handled
def collateral(
    directory: Dir,
    out: Annotated[Path, typer.Option("--out", help="Writes OUT/sgx/ and OUT/tdx/ bundles.")],
    tcb_status: Annotated[
        str, typer.Option("--tcb-status", help="UpToDate ... OutOfDateConfigurationNeeded, Revoked")
    ] = "UpToDate",
    advisories: Annotated[str, typer.Option("--advisories", help="Comma-separated INTEL-SA ids.")] = "",
    valid_from: Annotated[datetime | None, typer.Option("--valid-from", help="issueDate/thisUpdate (UTC).")] = None,
    valid_days: Annotated[int, typer.Option("--valid-days")] = 30,
    crl_days: Annotated[int | None, typer.Option("--crl-days", help="CRL validity, if not --valid-days.")] = None,
    revoke_pck: Annotated[bool, typer.Option("--revoke-pck", help="Revoke the platform's PCK certificate.")] = False,
    revoke_pck_ca: Annotated[bool, typer.Option("--revoke-pck-ca", help="Revoke the PCK CA.")] = False,
    qe_mrsigner: Hex = None,
    platform: Annotated[str, typer.Option("--platform")] = "default",
) -> None:
    """Collateral bundles for the simulated platform, importable with 'keybroker collateral import'."""
    from keybroker.sim.collateral import CollateralSpec, make_collateral
    from keybroker.sim.pki import SimPki

    start = (valid_from if valid_from.tzinfo else valid_from.replace(tzinfo=UTC)) if valid_from else None
    spec = CollateralSpec(
        platform=platform,
        tcb_status=tcb_status,
        advisories=tuple(a.strip() for a in advisories.split(",") if a.strip()),
        valid_from=start,
        valid_days=valid_days,
        crl_days=crl_days,
        revoked_pck=revoke_pck,
        revoked_pck_ca=revoke_pck_ca,
        qe_mrsigner=qe_mrsigner.upper() if qe_mrsigner else None,
    )
    written = make_collateral(SimPki(directory), out, spec, datetime.now(UTC))
    output.stderr.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)
