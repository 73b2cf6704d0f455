"""``keybroker attestation|collateral``: offline verification, the token key, appraisal policies, collateral."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from keybroker.cli import output
from keybroker.cli.common import (
    FileProblem,
    OutputOpt,
    handled,
    input_dir,
    output_dir,
    read_bytes,
    read_text,
    remote,
    segment,
)
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output
from keybroker.errors import AttestationFailed, CollateralInvalid, CollateralUnavailable

attestation_app = typer.Typer(help="Verify quotes; manage the token key and appraisal policies.", no_args_is_help=True)
policy_app = typer.Typer(help="Appraisal policies (Rego).", no_args_is_help=True)
attestation_app.add_typer(policy_app, name="policy")
collateral_app = typer.Typer(help="Intel collateral: import, export, status.", no_args_is_help=True)


def _bundles(folder: Path) -> list[Path]:
    from keybroker.attestation.collateral import is_bundle

    input_dir(folder)
    if is_bundle(folder):
        return [folder]
    found = sorted(p for p in folder.iterdir() if p.is_dir() and is_bundle(p))
    if not found:
        raise FileProblem(f"{folder} is neither a collateral bundle nor a folder of bundles")
    return found


# What a bundle's files that are not what they should be raise in the parsers (truncated JSON, a missing member,
# DER that is no CRL, text that is not UTF-8, an item that does not verify); reported as the bundle's problem.
_BAD_BUNDLE = (CollateralInvalid, ValueError, KeyError, TypeError, IndexError)


def _bundle_problem(bundle: Path, exc: Exception) -> FileProblem:
    if isinstance(exc, CollateralInvalid):
        detail = exc.detail
    elif isinstance(exc, KeyError) and exc.args:
        detail = f"{exc.args[0]!s} is missing"
    else:
        detail = str(exc).split("\n")[0]
    return FileProblem(f"cannot read the collateral bundle {bundle}: {detail or type(exc).__name__}")


@attestation_app.command("verify")
@handled
def verify(
    quote_file: Annotated[Path, typer.Argument(metavar="QUOTE", help="The quote (binary).")],
    collateral: Annotated[
        Path, typer.Option("--collateral", metavar="DIR", help="A bundle folder, or a folder of bundles.")
    ],
    at: Annotated[
        datetime | None,
        typer.Option("--at", metavar="TIME", help="Verify as of TIME (RFC 3339, UTC if no zone); default now."),
    ] = None,
    simulated_root: Annotated[
        Path | None,
        typer.Option("--simulated-root", metavar="FILE", help="Also trust this simulated TEE root (development)."),
    ] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Verify a quote offline (no server): exit 0 if it verifies, whatever its TCB status; 1 if it does not.

    Example: keybroker attestation verify quote.bin --collateral tests/data/dcap/real --at 2025-06-23T00:00:00Z
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from keybroker.attestation.collateral import read_bundle
    from keybroker.attestation.store import MemoryCollateral
    from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der

    simulated = None
    if simulated_root is not None:
        try:
            root = x509.load_pem_x509_certificate(read_bytes(simulated_root))
        except ValueError:
            raise FileProblem(f"cannot read {simulated_root}: it holds no PEM certificate") from None
        simulated = root.public_bytes(serialization.Encoding.DER)
    anchors = TrustAnchors(intel_root_der(), simulated)
    quote = read_bytes(quote_file)
    items = []
    for folder in _bundles(collateral):
        try:
            items += read_bundle(folder, anchors.roots())
        except _BAD_BUNDLE as exc:
            raise _bundle_problem(folder, exc) from None
    now = (at if at.tzinfo else at.replace(tzinfo=UTC)) if at else datetime.now(UTC)
    try:
        verified = QuoteVerifier(MemoryCollateral(items), anchors).verify(quote, now)
    except (AttestationFailed, CollateralUnavailable) as exc:
        reason = exc.reason if isinstance(exc, AttestationFailed) else exc.instance_code
        if output_format is Output.JSON:
            output.emit_json({"verified": False, "reason": reason, "detail": exc.detail})
        else:
            output.say("refused", f"({reason}): {exc.detail}")
        raise typer.Exit(1) from None
    claims = verified.claims()
    if output_format is Output.JSON:
        output.emit_json({"verified": True, **claims})
    else:
        output.say(
            "verified:", f"{verified.quote.tee} quote v{verified.quote.version}, TCB {verified.tcb_status}", "green"
        )
        output.details(claims)


@attestation_app.command("rotate-key")
@handled
@remote
def rotate_key(api: AdminApi) -> None:
    """Start signing attestation tokens with a new key (old tokens stay verifiable until they expire).

    Example: keybroker attestation rotate-key
    """
    with api:
        kid = api.request("POST", "/appraisal/v1/keys/rotate").json()["kid"]
    output.stderr.print(f"token signing key is now {kid}", highlight=False)


@policy_app.command("create")
@handled
@remote
def policy_create(
    api: AdminApi,
    name: Annotated[str, typer.Argument(metavar="NAME", help="A name for people.")],
    rego_file: Annotated[Path, typer.Argument(metavar="FILE", help="Rego module: package policy, rule allow.")],
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Upload an appraisal policy; its id goes into transfer policies' policy_ids.

    Example: keybroker attestation policy create up-to-date up-to-date.rego -o id
    """
    module = read_text(rego_file, "Rego")
    with api:
        created = api.request("POST", "/appraisal/v1/policies", json={"name": name, "policy": module}).json()
    output.emit(created, output_format, lambda: output.details(created))


@policy_app.command("list")
@handled
@remote
def policy_list(
    api: AdminApi,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List appraisal policies.

    Example: keybroker attestation policy list -o json
    """
    with api:
        policies = api.get_json("/appraisal/v1/policies")
    output.emit(
        policies,
        output_format,
        lambda: output.table(
            ("ID", "NAME", "UPDATED"), [[p["id"], p["name"], output.short_time(p["updated_at"])] for p in policies]
        ),
    )


@policy_app.command("delete")
@handled
@remote
def policy_delete(
    api: AdminApi,
    policy_id: Annotated[str, typer.Argument(metavar="POLICY_ID", help="Appraisal policy id.")],
) -> None:
    """Delete an appraisal policy.

    Example: keybroker attestation policy delete "$APPRAISAL_POLICY"
    """
    with api:
        api.request("DELETE", f"/appraisal/v1/policies/{segment(policy_id)}")
    output.stderr.print(f"deleted appraisal policy {policy_id}", highlight=False)


@collateral_app.command("import")
@handled
@remote
def collateral_import(
    api: AdminApi,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A bundle folder, or a folder of bundles.")],
) -> None:
    """Import offline collateral (air-gapped sites). The server checks every item before storing any.

    Example: keybroker collateral import tests/data/dcap/real
    """
    from keybroker.attestation.collateral import bundle_upload

    uploads = []
    for bundle in _bundles(folder):  # (all read before any is sent: a bad one changes nothing)
        try:
            uploads.append((bundle, bundle_upload(bundle)))
        except _BAD_BUNDLE as exc:
            raise _bundle_problem(bundle, exc) from None
    with api:
        for bundle, upload in uploads:
            body = {"items": upload, "source": f"bundle {bundle.name}"}
            result = api.request("POST", "/collateral/v1/items", json=body).json()
            output.stderr.print(f"{bundle.name}: {result['added']} new of {result['received']} items", highlight=False)


@collateral_app.command("export")
@handled
@remote
def collateral_export(
    api: AdminApi,
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write one bundle folder per TCB info.")],
) -> None:
    """Export the newest cached collateral as bundle folders (for another, air-gapped keybroker).

    Example: keybroker collateral export /media/usb/collateral
    """
    from keybroker.attestation.collateral import write_bundle_files

    output_dir(folder)  # (before anything is fetched)
    with api:
        items = api.get_json("/collateral/v1/items")
    written = write_bundle_files(folder, [(i["key"], base64.b64decode(i["body"]), i["issuer_chain"]) for i in items])
    output.stderr.print(f"wrote {len(written)} bundle(s) to {folder}", highlight=False)


@collateral_app.command("status")
@handled
@remote
def collateral_status(
    api: AdminApi,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Every cached item and when it expires.

    Example: keybroker collateral status -o json
    """
    with api:
        items = api.get_json("/collateral/v1/status")
    for item in items:
        item["id"] = f"{item['key']}@{item['issue_date']}"
    output.emit(
        items,
        output_format,
        lambda: output.table(
            ("ITEM", "ISSUED", "NEXT UPDATE", "STATE", "SOURCE"),
            [
                [
                    i["key"],
                    output.short_time(i["issue_date"]),
                    output.short_time(i["next_update"]),
                    i["state"],
                    i["source"],
                ]
                for i in items
            ],
        ),
    )
