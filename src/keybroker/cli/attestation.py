"""``keybroker attestation|collateral``: offline verification, the token key, appraisal policies, collateral."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from keybroker.cli import output
from keybroker.cli.common import OutputOpt, handled, remote, segment
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output
from keybroker.errors import AttestationFailed, CollateralUnavailable

attestation_app = typer.Typer(help="Verify quotes; manage the token key and appraisal policies.", no_args_is_help=True)
policy_app = typer.Typer(help="Appraisal policies (Rego).", no_args_is_help=True)
attestation_app.add_typer(policy_app, name="policy")
collateral_app = typer.Typer(help="Intel collateral: import, export, status.", no_args_is_help=True)


def _bundles(folder: Path) -> list[Path]:
    from keybroker.attestation.collateral import is_bundle

    if is_bundle(folder):
        return [folder]
    found = sorted(p for p in folder.iterdir() if p.is_dir() and is_bundle(p)) if folder.is_dir() else []
    if not found:
        raise typer.BadParameter(f"{folder} is neither a collateral bundle nor a folder of bundles")
    return found


@attestation_app.command("verify")
@handled
def verify(
    quote_file: Annotated[Path, typer.Argument(help="The quote (binary).")],
    collateral: Annotated[Path, typer.Option("--collateral", help="A bundle folder, or a folder of bundles.")],
    at: Annotated[
        datetime | None, typer.Option("--at", help="Verify as of this time (RFC 3339, UTC if no zone); default now.")
    ] = None,
    simulated_root: Annotated[
        Path | None, typer.Option("--simulated-root", help="Also trust this simulated TEE root (development).")
    ] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Verify a quote offline (no server): exit 0 if it verifies, whatever its TCB status; 1 if it does not."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from keybroker.attestation.collateral import read_bundle
    from keybroker.attestation.store import MemoryCollateral
    from keybroker.attestation.verifier import QuoteVerifier, TrustAnchors, intel_root_der

    simulated = None
    if simulated_root is not None:
        simulated = x509.load_pem_x509_certificate(simulated_root.read_bytes()).public_bytes(serialization.Encoding.DER)
    anchors = TrustAnchors(intel_root_der(), simulated)
    items = [item for folder in _bundles(collateral) for item in read_bundle(folder, anchors.roots())]
    now = (at if at.tzinfo else at.replace(tzinfo=UTC)) if at else datetime.now(UTC)
    try:
        verified = QuoteVerifier(MemoryCollateral(items), anchors).verify(quote_file.read_bytes(), now)
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
    """Start signing attestation tokens with a new key (old tokens stay verifiable until they expire)."""
    with api:
        kid = api.request("POST", "/appraisal/v1/keys/rotate").json()["kid"]
    output.stderr.print(f"token signing key is now {kid}", highlight=False)


@policy_app.command("create")
@handled
@remote
def policy_create(
    api: AdminApi,
    name: Annotated[str, typer.Argument(help="A name for people.")],
    rego_file: Annotated[Path, typer.Argument(help="Rego module: package policy, rule allow.")],
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Upload an appraisal policy; its id goes into transfer policies' policy_ids."""
    with api:
        created = api.request(
            "POST", "/appraisal/v1/policies", json={"name": name, "policy": rego_file.read_text()}
        ).json()
    output.emit(created, output_format, lambda: output.details(created))


@policy_app.command("list")
@handled
@remote
def policy_list(
    api: AdminApi,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List appraisal policies."""
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
    policy_id: Annotated[str, typer.Argument(help="Policy id.")],
) -> None:
    """Delete an appraisal policy."""
    with api:
        api.request("DELETE", f"/appraisal/v1/policies/{segment(policy_id)}")
    output.stderr.print(f"deleted appraisal policy {policy_id}", highlight=False)


@collateral_app.command("import")
@handled
@remote
def collateral_import(
    api: AdminApi,
    folder: Annotated[Path, typer.Argument(help="A bundle folder, or a folder of bundles.")],
) -> None:
    """Import offline collateral (air-gapped sites). The server checks every item before storing any."""
    from keybroker.attestation.collateral import bundle_upload

    with api:
        for bundle in _bundles(folder):
            body = {"items": bundle_upload(bundle), "source": f"bundle {bundle.name}"}
            result = api.request("POST", "/collateral/v1/items", json=body).json()
            output.stderr.print(f"{bundle.name}: {result['added']} new of {result['received']} items", highlight=False)


@collateral_app.command("export")
@handled
@remote
def collateral_export(
    api: AdminApi,
    folder: Annotated[Path, typer.Argument(help="Where to write one bundle folder per TCB info.")],
) -> None:
    """Export the newest cached collateral as bundle folders (for another, air-gapped keybroker)."""
    from keybroker.attestation.collateral import write_bundle_files

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
    """Every cached item and when it expires."""
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
