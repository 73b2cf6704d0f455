"""``keybroker key``: create, import, register, list, show, re-assign, certify and delete keys (over the API)."""

from __future__ import annotations

import base64
import enum
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.cli import answers, output
from keybroker.cli.common import (
    FileProblem,
    OutputOpt,
    handled,
    output_file,
    read_bytes,
    remote,
    segment,
    write_file,
)
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output

key_app = typer.Typer(help="Create, import, list, show and delete keys.", no_args_is_help=True)


class ImportFormat(enum.StrEnum):
    AUTO = "auto"
    PEM = "pem"
    BASE64 = "base64"
    RAW = "raw"


def _key_information(
    algorithm: str, length: int | None, curve: str | None, key_id: str | None = None
) -> dict[str, Any]:
    info: dict[str, Any] = {"algorithm": algorithm}
    if length is not None:
        info["key_length"] = length
    if curve is not None:
        info["curve_type"] = curve
    if key_id is not None:
        info["id"] = key_id
    return info


def _create(
    api: AdminApi,
    info: dict[str, Any],
    policy: str,
    label: str | None,
    usage: str | None,
    backend: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"key_information": info, "transfer_policy_id": policy}
    for name, value in (("label", label), ("usage", usage), ("backend", backend)):
        if value is not None:
            body[name] = value
    created: dict[str, Any] = api.request("POST", "/kbs/v1/keys", json=body).json()
    return created


def _show_key(key: dict[str, Any], output_format: Output) -> None:
    output.emit(key, output_format, lambda: output.table(output.KEY_COLUMNS, [output.key_row(key)]))


Algo = Annotated[str, typer.Option("--algorithm", "-a", metavar="ALGORITHM", help="AES, RSA or EC.")]
Length = Annotated[
    int | None, typer.Option("--length", "-l", metavar="BITS", help="AES 128, 192 or 256; RSA 2048 to 7680.")
]
Curve = Annotated[
    str | None, typer.Option("--curve", metavar="CURVE", help="EC curve: secp256r1, secp384r1 or secp521r1.")
]
Policy = Annotated[str, typer.Option("--policy", "-p", metavar="POLICY_ID", help="The key's transfer policy.")]
Label = Annotated[str | None, typer.Option("--label", metavar="TEXT", help="A name for people, shown in lists.")]
Usage = Annotated[str | None, typer.Option("--usage", metavar="TEXT", help="What the key is for (free text).")]
Backend = Annotated[
    str | None,
    typer.Option("--backend", metavar="NAME", help="A configured backend (default: the default backend)."),
]


@key_app.command("create")
@handled
@remote
def key_create(
    api: AdminApi,
    algorithm: Algo,
    policy: Policy,
    length: Length = None,
    curve: Curve = None,
    label: Label = None,
    usage: Usage = None,
    backend: Backend = None,
    key_id: Annotated[
        str | None, typer.Option("--id", metavar="UUID", help="Choose the key id (default: a random UUID).")
    ] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Generate a new key inside keybroker.

    Example: keybroker key create -a AES -l 256 -p "$POLICY" --label db
    """
    with api:
        key = _create(api, _key_information(algorithm, length, curve, key_id), policy, label, usage, backend)
    _show_key(key, output_format)


@key_app.command("import")
@handled
@remote
def key_import(
    api: AdminApi,
    algorithm: Algo,
    policy: Policy,
    file: Annotated[
        Path, typer.Option("--file", "-f", metavar="FILE", help="Key file ('-' for stdin).", allow_dash=True)
    ],
    length: Length = None,
    curve: Curve = None,
    key_format: Annotated[
        ImportFormat,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="auto (PEM for RSA and EC, raw bytes for AES), pem, raw, or base64 (AES as text).",
        ),
    ] = ImportFormat.AUTO,
    label: Label = None,
    usage: Usage = None,
    backend: Backend = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Import existing key material (PEM private key for RSA/EC; raw or base64 bytes for AES).

    Example: keybroker key import -a RSA -l 3072 -p "$POLICY" -f rsa.pem
    """
    data = read_bytes(file)
    key_string = _key_string(algorithm, data, key_format)
    info = {**_key_information(algorithm, length, curve), "key_string": key_string}
    with api:
        key = _create(api, info, policy, label, usage, backend)
    _show_key(key, output_format)


@key_app.command("register")
@handled
@remote
def key_register(
    api: AdminApi,
    algorithm: Algo,
    policy: Policy,
    kmip_key_id: Annotated[
        str,
        typer.Option("--kmip-key-id", metavar="KMIP_ID", help="Unique identifier of the existing KMIP object."),
    ],
    backend: Annotated[str | None, typer.Option("--backend", metavar="NAME", help="A configured KMIP backend.")] = None,
    length: Length = None,
    curve: Curve = None,
    label: Label = None,
    usage: Usage = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Register an object that already exists in a KMIP server (deleting the key later leaves the object).

    Example: keybroker key register -a AES -l 256 -p "$POLICY" --kmip-key-id 42 --backend kmip
    """
    info = {**_key_information(algorithm, length, curve), "kmip_key_id": kmip_key_id}
    with api:
        key = _create(api, info, policy, label, usage, backend)
    _show_key(key, output_format)


def _write_certificate(certificate: dict[str, Any], out: Path | None, output_format: Output) -> None:
    if out is not None:
        try:
            write_file(out, certificate["certificate"])
        except FileProblem as exc:  # (checked before the request: this is a race or a full disk)
            raise FileProblem(
                f"{exc}; the certificate was issued: 'keybroker key certificate {certificate['key_id']} -O FILE' "
                "fetches it again"
            ) from None
    summary = {name: certificate[name] for name in ("key_id", "serial", "subject", "san", "not_after", "sha384")}
    if output_format is Output.JSON:
        output.emit_json(certificate if out is None else summary)
    elif out is None:
        typer.echo(certificate["certificate"], nl=False)
    else:
        output.stderr.print(f"certificate for key {certificate['key_id']} written to {out}")
        output.details(summary)


@key_app.command("certify")
@handled
@remote
def key_certify(
    api: AdminApi,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="An RSA or EC key held by keybroker.")],
    subject: Annotated[str, typer.Option("--subject", metavar="DN", help="Subject (RFC 4514), e.g. CN=web.example.")],
    san: Annotated[
        list[str] | None,
        typer.Option("--san", metavar="SAN", help="DNS:name or IP:address; repeat it or separate with commas."),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, max=825, metavar="DAYS", help="Validity in days.")] = 365,
    out: Annotated[
        Path | None, typer.Option("--out", "-O", metavar="FILE", help="Write the PEM chain here (default: stdout).")
    ] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Issue a certificate for a broker-held key, signed by the service CA (the guide's run.sh step for Nginx).

    Example: keybroker key certify "$KEY" --subject CN=web.example --san DNS:web.example -O web.crt
    """
    sans = [entry.strip() for value in san or [] for entry in value.split(",") if entry.strip()]
    body = {"subject": subject, "san": sans, "days": days}
    if out is not None:
        output_file(out)  # (before the certificate is issued)
    with api:
        certificate = api.request("POST", f"/kbs/v1/keys/{segment(key_id)}/certificate", json=body).json()
    _write_certificate(certificate, out, output_format)


@key_app.command("certificate")
@handled
@remote
def key_certificate(
    api: AdminApi,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="The certified key.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-O", metavar="FILE", help="Write the PEM chain here (default: stdout).")
    ] = None,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Fetch the newest certificate issued for a key.

    Example: keybroker key certificate "$KEY" -O web.crt
    """
    if out is not None:
        output_file(out)
    with api:
        certificate = api.request("GET", f"/kbs/v1/keys/{segment(key_id)}/certificate").json()
    _write_certificate(certificate, out, output_format)


def _key_string(algorithm: str, data: bytes, key_format: ImportFormat) -> str:
    if key_format is ImportFormat.AUTO:
        key_format = ImportFormat.RAW if algorithm.upper() == "AES" else ImportFormat.PEM
    if key_format is ImportFormat.RAW:
        return base64.b64encode(data).decode()
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise typer.BadParameter(f"the key file is not {key_format} text", param_hint="--file") from None


@key_app.command("list")
@handled
@remote
def key_list(
    api: AdminApi,
    algorithm: Annotated[
        str | None, typer.Option("--algorithm", "-a", metavar="ALGORITHM", help="Only AES, RSA or EC keys.")
    ] = None,
    length: Length = None,
    curve: Curve = None,
    policy: Annotated[
        str | None, typer.Option("--policy", "-p", metavar="POLICY_ID", help="Only keys with this policy.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", metavar="N", help="Page size.")] = 100,
    fetch_all: Annotated[bool, typer.Option("--all", help="Follow pages to the end.")] = False,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List keys (metadata only).

    Example: keybroker key list -a RSA -o json
    """
    params: dict[str, Any] = {"limit": limit}
    for name, value in (
        ("algorithm", algorithm),
        ("keyLength", length),
        ("curveType", curve),
        ("transferPolicyId", policy),
    ):
        if value is not None:
            params[name] = value
    with api:
        keys = api.list_all("/kbs/v1/keys", params, fetch_all, answers.KEY)
    output.emit(keys, output_format, lambda: output.table(output.KEY_COLUMNS, [output.key_row(k) for k in keys]))


KeyIdArg = Annotated[str, typer.Argument(metavar="KEY_ID", help="Key id.")]


@key_app.command("show")
@handled
@remote
def key_show(
    api: AdminApi,
    key_id: KeyIdArg,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Show one key's metadata.

    Example: keybroker key show "$KEY"
    """
    with api:
        key = api.get_json(f"/kbs/v1/keys/{segment(key_id)}", shape=answers.KEY)
    output.emit(key, output_format, lambda: output.details(key))


@key_app.command("set-policy")
@handled
@remote
def key_set_policy(
    api: AdminApi,
    key_id: KeyIdArg,
    policy: Annotated[str, typer.Argument(metavar="POLICY_ID", help="New transfer policy id.")],
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Re-assign a key's transfer policy.

    Example: keybroker key set-policy "$KEY" "$POLICY"
    """
    with api:
        key = api.request("PUT", f"/kbs/v1/keys/{segment(key_id)}", json={"transfer_policy_id": policy}).json()
    _show_key(key, output_format)


@key_app.command("delete")
@handled
@remote
def key_delete(
    api: AdminApi,
    key_id: KeyIdArg,
) -> None:
    """Delete a key and its material in the backend.

    Example: keybroker key delete "$KEY"
    """
    with api:
        api.request("DELETE", f"/kbs/v1/keys/{segment(key_id)}")
    output.stderr.print(f"deleted key {key_id}", highlight=False)


# --- policies -------------------------------------------------------------------------------------------------
