"""``keybroker policy``: key transfer policies (over the API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from keybroker.cli import answers, output
from keybroker.cli.common import OutputOpt, handled, read_text, remote, segment
from keybroker.cli.http import AdminApi
from keybroker.cli.output import Output

policy_app = typer.Typer(help="Manage key transfer policies.", no_args_is_help=True)


PolicyFile = Annotated[Path, typer.Argument(metavar="FILE", help="Policy JSON file ('-' for stdin).", allow_dash=True)]
PolicyIdArg = Annotated[str, typer.Argument(metavar="POLICY_ID", help="Policy id.")]


def _read_policy(file: Path) -> Any:
    text = read_text(file, "JSON")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{file} is not valid JSON: {exc}", param_hint="FILE") from None
    except RecursionError:
        raise typer.BadParameter(f"{file} is not a policy: its JSON is nested too deeply", param_hint="FILE") from None


def _show_policy(policy: dict[str, Any], output_format: Output) -> None:
    output.emit(policy, output_format, lambda: output.details(policy))


@policy_app.command("create")
@handled
@remote
def policy_create(
    api: AdminApi,
    file: PolicyFile,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Create a key transfer policy from a JSON file.

    Example: keybroker policy create examples/transfer-policy.json -o id
    """
    with api:
        policy = api.request("POST", "/kbs/v1/key-transfer-policies", json=_read_policy(file)).json()
    _show_policy(policy, output_format)


@policy_app.command("update")
@handled
@remote
def policy_update(
    api: AdminApi,
    policy_id: PolicyIdArg,
    file: PolicyFile,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Replace a (mutable) key transfer policy with the JSON file's content.

    Example: keybroker policy update "$POLICY" policy.json
    """
    with api:
        policy = api.request(
            "PUT", f"/kbs/v1/key-transfer-policies/{segment(policy_id)}", json=_read_policy(file)
        ).json()
    _show_policy(policy, output_format)


@policy_app.command("list")
@handled
@remote
def policy_list(
    api: AdminApi,
    limit: Annotated[int, typer.Option("--limit", metavar="N", help="Page size.")] = 100,
    fetch_all: Annotated[bool, typer.Option("--all", help="Follow pages to the end.")] = False,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """List key transfer policies.

    Example: keybroker policy list --all -o json
    """
    with api:
        policies = api.list_all("/kbs/v1/key-transfer-policies", {"limit": limit}, fetch_all, answers.POLICY)
    output.emit(
        policies,
        output_format,
        lambda: output.table(output.POLICY_COLUMNS, [output.policy_row(p) for p in policies]),
    )


@policy_app.command("show")
@handled
@remote
def policy_show(
    api: AdminApi,
    policy_id: PolicyIdArg,
    output_format: OutputOpt = Output.TABLE,
) -> None:
    """Show one key transfer policy.

    Example: keybroker policy show "$POLICY"
    """
    with api:
        _show_policy(api.get_json(f"/kbs/v1/key-transfer-policies/{segment(policy_id)}", shape=dict), output_format)


@policy_app.command("delete")
@handled
@remote
def policy_delete(
    api: AdminApi,
    policy_id: PolicyIdArg,
) -> None:
    """Delete a key transfer policy (refused while a key uses it, or if it is immutable).

    Example: keybroker policy delete "$POLICY"
    """
    with api:
        api.request("DELETE", f"/kbs/v1/key-transfer-policies/{segment(policy_id)}")
    output.stderr.print(f"deleted policy {policy_id}", highlight=False)
