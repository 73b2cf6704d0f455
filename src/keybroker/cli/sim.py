"""``keybroker sim``: the simulated TEE (development and CI; see dcap-test-pki.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.cli import output
from keybroker.cli.common import handled, input_dir, output_dir, output_file, write_file

sim_app = typer.Typer(help="Simulated TEE: a test PKI, quotes and collateral in Intel's formats.", no_args_is_help=True)

Dir = Annotated[Path, typer.Argument(metavar="DIR", help="The simulator's directory.")]
Platform = Annotated[str, typer.Option("--platform", metavar="NAME", help="The platform (from 'sim init').")]


def _hex_option(size: int, field: str, default: str = "zeros") -> Any:
    """A measurement given in hexadecimal: SIZE bytes of FIELD."""
    return typer.Option(metavar="HEX", show_default=False, help=f"{field}: {size} bytes in hex (default {default}).")


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
    platform: Annotated[str, typer.Option("--platform", metavar="NAME", help="Platform name.")] = "default",
    fmspc: Annotated[str, typer.Option("--fmspc", metavar="HEX", help="FMSPC: 6 bytes in hex.")] = "00906ED50000",
    ca: Annotated[str, typer.Option("--ca", metavar="CA", help="PCK CA: platform or processor.")] = "platform",
    cpusvn: Annotated[str, _hex_option(16, "CPUSVN", "0a0a0202ff01, then zeros")] = "0a0a0202ff0100000000000000000000",
    pcesvn: Annotated[int, typer.Option("--pcesvn", metavar="N", help="PCESVN.")] = 13,
    tee_tcb_svn: Annotated[
        str, _hex_option(16, "TDX TEE_TCB_SVN", "030102, then zeros")
    ] = "03010200000000000000000000000000",
) -> None:
    """Create the test PKI (once) and a platform (once per name). The trust anchor is DIR/root-ca.pem.

    Example: keybroker sim init sim/ --platform tdx-host
    """
    from keybroker.sim.pki import PlatformSpec, add_platform, init_pki

    now = datetime.now(UTC)
    pki = init_pki(output_dir(directory), now)
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
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="Where to write the quote.")],
    tee: Annotated[str, typer.Option("--tee", metavar="TEE", help="sgx or tdx.")] = "sgx",
    version: Annotated[
        int | None, typer.Option("--version", metavar="N", help="Quote version: 3 (SGX); 4 or 5 (TDX).")
    ] = None,
    td_report_15: Annotated[bool, typer.Option("--td-report-15", help="v5: TD report 1.5.")] = False,
    report_data: Annotated[str | None, _hex_option(64, "REPORT_DATA")] = None,
    mrenclave: Annotated[str | None, _hex_option(32, "SGX MRENCLAVE")] = None,
    mrsigner: Annotated[str | None, _hex_option(32, "SGX MRSIGNER")] = None,
    isvprodid: Annotated[int, typer.Option("--isvprodid", metavar="N", help="SGX ISVPRODID.")] = 0,
    isvsvn: Annotated[int, typer.Option("--isvsvn", metavar="N", help="SGX ISVSVN.")] = 0,
    config_id: Annotated[str | None, _hex_option(64, "SGX CONFIGID")] = None,
    config_svn: Annotated[int, typer.Option("--config-svn", metavar="N", help="SGX CONFIGSVN.")] = 0,
    mrtd: Annotated[str | None, _hex_option(48, "TDX MRTD")] = None,
    rtmr0: Annotated[str | None, _hex_option(48, "TDX RTMR0")] = None,
    rtmr1: Annotated[str | None, _hex_option(48, "TDX RTMR1")] = None,
    rtmr2: Annotated[str | None, _hex_option(48, "TDX RTMR2")] = None,
    rtmr3: Annotated[str | None, _hex_option(48, "TDX RTMR3")] = None,
    mrconfigid: Annotated[str | None, _hex_option(48, "TDX MRCONFIGID")] = None,
    mrowner: Annotated[str | None, _hex_option(48, "TDX MROWNER")] = None,
    td_attributes: Annotated[str | None, _hex_option(8, "TDX TD attributes", "SEPT_VE_DISABLE only")] = None,
    xfam: Annotated[str | None, _hex_option(8, "TDX XFAM", "e702060000000000")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="A debug enclave / TD (always refused).")] = False,
    wrong_key: Annotated[bool, typer.Option("--wrong-key", help="Sign with another key (negative test).")] = False,
    platform: Platform = "default",
) -> None:
    """Produce a quote over REPORT_DATA (64 bytes of hex) with the given measurements.

    Example: keybroker sim quote sim/ --tee tdx --version 5 --out quote.bin
    """
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
    output_file(out)
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
    write_file(out, raw)
    output.stderr.print(f"wrote a {tee.upper()} quote ({len(raw)} bytes) to {out}", highlight=False)


@sim_app.command("collateral")
@handled
def collateral(
    directory: Dir,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Writes DIR/sgx/ and DIR/tdx/ bundles.")],
    tcb_status: Annotated[
        str,
        typer.Option(
            "--tcb-status", metavar="STATUS", help="The TCB's: UpToDate, SWHardeningNeeded, OutOfDate, Revoked, ..."
        ),
    ] = "UpToDate",
    advisories: Annotated[str, typer.Option("--advisories", metavar="IDS", help="Comma-separated INTEL-SA ids.")] = "",
    valid_from: Annotated[
        datetime | None,
        typer.Option("--valid-from", metavar="TIME", help="Start of validity: issueDate, thisUpdate (UTC)."),
    ] = None,
    valid_days: Annotated[int, typer.Option("--valid-days", metavar="DAYS", help="Validity in days.")] = 30,
    crl_days: Annotated[
        int | None, typer.Option("--crl-days", metavar="DAYS", help="CRL validity, if not --valid-days.")
    ] = None,
    revoke_pck: Annotated[bool, typer.Option("--revoke-pck", help="Revoke the platform's PCK certificate.")] = False,
    revoke_pck_ca: Annotated[bool, typer.Option("--revoke-pck-ca", help="Revoke the PCK CA.")] = False,
    qe_mrsigner: Annotated[str | None, _hex_option(32, "Another QE MRSIGNER (negative tests)", "the QE's")] = None,
    platform: Platform = "default",
) -> None:
    """Collateral bundles for the simulated platform, importable with 'keybroker collateral import'.

    Example: keybroker sim collateral sim/ --out sim/collateral --tcb-status OutOfDate
    """
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
    written = make_collateral(SimPki(input_dir(directory)), output_dir(out), spec, datetime.now(UTC))
    output.stderr.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)
