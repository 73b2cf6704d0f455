"""``keybroker token|role|audit|ca``: tokens and roles (the AAS role), the audit log, the service CA (CMS)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.audit.chain import verify_chain
from keybroker.cli import answers, output
from keybroker.cli.common import (
    DataDir,
    FileProblem,
    OutputOpt,
    handled,
    output_file,
    read_bytes,
    read_text,
    remote,
    segment,
    write_file,
)
from keybroker.cli.http import AdminApi
from keybroker.cli.kek import ca_rotation_app
from keybroker.cli.output import Output

token_app = typer.Typer(help="Issue, list and revoke API tokens.", no_args_is_help=True)
role_app = typer.Typer(help="Roles: named sets of permissions.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and verify the tamper-evident audit log.", no_args_is_help=True)
ca_app = typer.Typer(help="The service CA: fingerprint, certificate, CSR signing, rotation.", no_args_is_help=True)

TOKEN_COLUMNS = ("ID", "NAME", "ROLES", "CONTEXT", "EXPIRES", "REVOKED")


def _token_row(token: dict[str, Any]) -> list[str]:
    return [
        token["id"],
        token["name"],
        ",".join(token["roles"]),
        ",".join(token["context"]),
        output.short_time(token.get("expires_at") or ""),
        output.short_time(token.get("revoked_at") or ""),
    ]


@token_app.command("create")
@handled
@remote
def token_create(
    api: AdminApi,
    name: Annotated[str, typer.Option("--name", metavar="NAME", help="What the token is for.")],
    role: Annotated[
        list[str], typer.Option("--role", "-r", metavar="ROLE", help="Role (repeatable): admin, key-manager, ...")
    ],
    context: Annotated[
        list[str] | None,
        typer.Option("--context", "-c", metavar="VALUE", help="Permission context value (repeatable), e.g. nginx."),
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", metavar="DURATION", help="Lifetime: 30d, 12h, 15m, 90s (default from the server)."),
    ] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Issue a token. Its secret is printed once (stdout); keybroker keeps only a hash.

    Example: keybroker token create --name ci --role key-manager --ttl 30d
    """
    body: dict[str, Any] = {"name": name, "roles": role, "context": context or []}
    if ttl is not None:
        body["ttl_seconds"] = _seconds(ttl)
    with api:
        created = api.request("POST", "/kbs/v1/tokens", json=body).json()
    if output_format is Output.JSON:
        output.emit_json(created)
        return
    if output_format is Output.TABLE:
        output.stderr.print(f"token {created['id']} ({created['name']}), expires {created['expires_at']}:")
    typer.echo(created["token"])


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit() or int(number) <= 0:
        raise typer.BadParameter("use a positive number with s, m, h or d, e.g. 30d", param_hint="--ttl")
    return int(number) * units[unit]


@token_app.command("list")
@handled
@remote
def token_list(
    api: AdminApi,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List tokens (never their secrets).

    Example: keybroker token list -o json
    """
    with api:
        tokens = api.get_json("/kbs/v1/tokens", shape=answers.TOKENS)
    output.emit(tokens, output_format, lambda: output.table(TOKEN_COLUMNS, [_token_row(t) for t in tokens]))


@token_app.command("revoke")
@handled
@remote
def token_revoke(
    api: AdminApi,
    token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID", help="Token id (from 'token list').")],
) -> None:
    """Revoke a token: it is refused from the next request on.

    Example: keybroker token revoke "$TOKEN_ID"
    """
    with api:
        api.request("DELETE", f"/kbs/v1/tokens/{segment(token_id)}")
    output.stderr.print(f"revoked token {token_id}", highlight=False)


@role_app.command("list")
@handled
@remote
def role_list(
    api: AdminApi,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List roles and their permissions.

    Example: keybroker role list -o json
    """
    with api:
        roles = api.get_json("/kbs/v1/roles", shape=answers.ROLES)
    for role in roles:
        role.setdefault("id", role["name"])
    output.emit(
        roles,
        output_format,
        lambda: output.table(
            ("ROLE", "BUILTIN", "PERMISSIONS"),
            [[r["name"], "yes" if r["builtin"] else "no", " ".join(r["permissions"])] for r in roles],
        ),
    )


@role_app.command("set")
@handled
@remote
def role_set(
    api: AdminApi,
    name: Annotated[str, typer.Argument(metavar="ROLE", help="Role name (created if new).")],
    permission: Annotated[
        list[str],
        typer.Option("--permission", "-p", metavar="PERMISSION", help="Permission (repeatable), e.g. keys:search."),
    ],
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Create a role or replace its permissions (applies to existing tokens at once).

    Example: keybroker role set reader -p keys:search -p keys:retrieve
    """
    with api:
        role = api.request("PUT", f"/kbs/v1/roles/{segment(name)}", json={"permissions": permission}).json()
    role["id"] = role["name"]
    output.emit(role, output_format, lambda: output.details(role))


@role_app.command("delete")
@handled
@remote
def role_delete(
    api: AdminApi,
    name: Annotated[str, typer.Argument(metavar="ROLE", help="Role name.")],
) -> None:
    """Delete a custom role that no unrevoked token holds.

    Example: keybroker role delete reader
    """
    with api:
        api.request("DELETE", f"/kbs/v1/roles/{segment(name)}")
    output.stderr.print(f"deleted role {name}", highlight=False)


def _all_entries(api: AdminApi, params: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    entries: list[dict[str, Any]] = []
    query = {**params, "after": 0}
    head = ""
    while True:
        response = api.request("GET", "/kbs/v1/audit", params=query)
        head = head or response.headers.get("x-audit-head", "")
        entries += answers.checked(response.json(), answers.AUDIT_ENTRIES, response.where)
        cursor = response.headers.get("x-next-cursor")
        if not cursor:
            if not re.fullmatch(r"(\d+:[0-9a-f]+)?", head):
                answers.checked(None, str, f"{response.where} (its X-Audit-Head)")
            return entries, head
        if not cursor.isdigit():
            answers.checked(None, str, f"{response.where} (its X-Next-Cursor)")
        query["after"] = int(cursor)


AUDIT_COLUMNS = ("SEQ", "AT", "ACTION", "OUTCOME", "TARGET", "ACTOR", "CLIENT")


@audit_app.command("list")
@handled
@remote
def audit_list(
    api: AdminApi,
    since: Annotated[
        datetime | None,
        typer.Option("--since", metavar="TIME", help="Only entries at or after TIME (RFC 3339; UTC if no zone)."),
    ] = None,
    key: Annotated[str | None, typer.Option("--key", metavar="KEY_ID", help="Only entries about this key.")] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List audit entries.

    Example: keybroker audit list --since 2026-11-27T00:00:00Z --key "$KEY"
    """
    params: dict[str, Any] = {}
    if since is not None:
        params["since"] = (since if since.tzinfo else since.replace(tzinfo=UTC)).isoformat()
    if key is not None:
        params["target"] = key
    with api:
        entries, _ = _all_entries(api, params)
    for entry in entries:
        entry.setdefault("id", entry["seq"])
    output.emit(
        entries,
        output_format,
        lambda: output.table(
            AUDIT_COLUMNS,
            [
                [
                    str(e["seq"]),
                    e["at"],
                    e["action"],
                    e["outcome"],
                    e["target"] or "",
                    e["actor"] or "",
                    e["client"] or "",
                ]
                for e in entries
            ],
        ),
    )


@audit_app.command("verify")
@handled
@remote
def audit_verify(
    api: AdminApi,
) -> None:
    """Recompute the whole hash chain here, from the entries the server returns; exit 1 naming the first bad
    entry if anything was edited, deleted, inserted or reordered.

    Example: keybroker audit verify
    """
    with api:
        entries, head = _all_entries(api, {})
    head_seq, _, head_hash = head.partition(":")
    report = verify_chain(entries, int(head_seq or 0), head_hash)
    if not report.ok:
        output.say("audit chain BROKEN", f"at entry {report.first_bad_seq}: {report.reason}")
        raise typer.Exit(1)
    output.stderr.print(f"audit chain intact: {report.checked} entries, head {head_hash[:16]}…", highlight=False)


@ca_app.command("fingerprint")
@handled
def ca_fingerprint_cmd(
    data_dir: DataDir = Path(".data"),
    cacert: Annotated[
        Path | None, typer.Option("--cacert", metavar="FILE", help="A CA file instead of ca.pem in the data directory.")
    ] = None,
) -> None:
    """Print the SHA-384 fingerprint of the service CA: clients pin it with --ca-fingerprint. During a CA rotation
    ca.pem holds two CAs: one line each, the older first.

    Example: keybroker ca fingerprint --data-dir /var/lib/keybroker
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from keybroker.ca import CA_CERT, fingerprint

    path = cacert or data_dir / CA_CERT
    try:
        pem = read_bytes(path)
    except FileProblem as exc:
        hint = "" if cacert else " (give the data directory with --data-dir, or the CA file with --cacert)"
        raise FileProblem(f"{exc}{hint}") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise FileProblem(f"cannot read {path}: it holds no PEM certificate") from None
    for certificate in certificates:
        typer.echo(fingerprint(certificate.public_bytes(serialization.Encoding.PEM)))


@ca_app.command("issue")
@handled
@remote
def ca_issue(
    api: AdminApi,
    csr: Annotated[Path, typer.Argument(metavar="CSR", help="PEM certificate signing request of the other service.")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="Where to write the certificate chain (PEM).")],
    days: Annotated[int, typer.Option("--days", metavar="DAYS", help="Validity in days (1-825).")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace the --out file if it exists.")] = False,
) -> None:
    """Have the service CA sign a CSR (TLS server and client certificate for another service). An existing --out
    file is replaced only with --force (atomically; a symlink is replaced, never followed).

    Example: keybroker ca issue vault.csr --out vault.crt --days 90
    """
    request = read_text(csr, "PEM")
    output_file(out, force)  # (before the certificate is issued)
    with api:
        response = api.request("POST", "/cms/v1/certificates", json={"csr": request, "days": days}, expect=(201,))
        chain = answers.checked(response.json(), {"certificate": str}, response.where)
    write_file(out, chain["certificate"], replace=force)
    output.stderr.print(f"wrote {out}", highlight=False)


ca_app.registered_commands += ca_rotation_app.registered_commands  # rotate, activate, retire: local (cli/kek.py)
