"""``keybroker``: the admin CLI (typer + rich), assembled from one module per command group.

Each group's module is imported only when the group runs: ``keybroker key list`` imports the key commands and
httpx, never SQLAlchemy, Alembic or a backend's library, and ``keybroker --help`` imports no command module at all
(it shows the summaries in COMMANDS; tests/unit/test_cli_imports.py checks that they match the groups' own help).
To add a group, add one line to COMMANDS; a command module imports at its top only typer and the CLI's light
modules (common, output, http), everything else inside its commands.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from keybroker import __version__
from keybroker.cli.common import PlainWhenPiped


@dataclass(frozen=True, slots=True)
class Lazy:
    """A command group, or one top-level command, imported when first looked up."""

    target: str  # "module:app" (a typer.Typer: the group) or "module:app:command" (one command of that Typer)
    summary: str  # the group's help (its first paragraph), for `keybroker --help`


COMMANDS: dict[str, Lazy] = {
    "init": Lazy(
        "keybroker.cli.server:server_app:init",
        "Initialise DATA_DIR: database, master key (0600), service CA (DATA_DIR/ca.pem) and the first admin token "
        "(printed once). Idempotent.",
    ),
    "serve": Lazy("keybroker.cli.server:server_app:serve", "Serve the API."),
    "key": Lazy("keybroker.cli.keys:key_app", "Create, import, list, show and delete keys."),
    "policy": Lazy("keybroker.cli.policies:policy_app", "Manage key transfer policies."),
    "config": Lazy("keybroker.cli.server:config_app", "Inspect the configuration."),
    "backends": Lazy(
        "keybroker.cli.backends:backends_app", "Check the configured KMS backends and finish interrupted writes."
    ),
    "token": Lazy("keybroker.cli.admin:token_app", "Issue, list and revoke API tokens."),
    "role": Lazy("keybroker.cli.admin:role_app", "Roles: named sets of permissions."),
    "audit": Lazy("keybroker.cli.admin:audit_app", "Read and verify the tamper-evident audit log."),
    "ca": Lazy("keybroker.cli.admin:ca_app", "The service CA: fingerprint, certificate, CSR signing, rotation."),
    "attestation": Lazy(
        "keybroker.cli.attestation:attestation_app", "Verify quotes; manage the token key and appraisal policies."
    ),
    "collateral": Lazy("keybroker.cli.attestation:collateral_app", "Intel collateral: import, export, status."),
    "sim": Lazy("keybroker.cli.sim:sim_app", "Simulated TEE: a test PKI, quotes and collateral in Intel's formats."),
    "cluster": Lazy("keybroker.cli.cluster:cluster_app", "The replicas that serve this deployment."),
    "db": Lazy(
        "keybroker.cli.db:db_app", "The database: move to PostgreSQL, back up SQLite, show the schema revision."
    ),
    "kek": Lazy("keybroker.cli.kek:kek_app", "The KEK: move what it wraps under a new one; which KEK wraps what."),
    "demo": Lazy("keybroker.cli.demos:demo_app", "See keybroker work end to end on this machine (simulated TEE)."),
}


def load(name: str) -> TyperCommand | TyperGroup:
    """The command ``name`` of COMMANDS, imported and built."""
    module, attribute, *command = COMMANDS[name].target.split(":")
    group = typer.main.get_group(getattr(importlib.import_module(module), attribute))
    found = group.commands[command[0]] if command else group
    found.name = name
    return found  # type: ignore[return-value]  # (typer builds only its own command classes)


class _Commands(MutableMapping[str, Any]):
    """The root's commands: the entries of COMMANDS, loaded when first looked up, then any registered directly."""

    def __init__(self, registered: MutableMapping[str, Any]) -> None:
        self._loaded: dict[str, Any] = dict(registered)

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = load(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*COMMANDS, *self._loaded]))

    def __len__(self) -> int:
        return len(COMMANDS.keys() | self._loaded.keys())


class LazyGroup(PlainWhenPiped):
    """The root group: resolves a command by importing its module; its help lists the summaries of COMMANDS."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _Commands(self.commands)
        self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        commands = self.commands
        unloaded = isinstance(commands, _Commands) and cmd_name in COMMANDS and not commands.is_loaded(cmd_name)
        if self._listing and unloaded:
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name].summary)  # (only read for the list of commands)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # (typer's reads every value: it would import every module)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def shell_complete(self, ctx: Any, incomplete: str) -> Any:
        self._listing = True  # (the names and summaries of the commands: completing them imports none)
        try:
            return super().shell_complete(ctx, incomplete)
        finally:
            self._listing = False


app = typer.Typer(
    name="keybroker",
    help="keybroker: releases keys only to attested Intel SGX / TDX workloads.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion, --show-completion (tests/integration/test_cli_completion.py)
    cls=LazyGroup,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"keybroker {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """keybroker admin CLI."""


def main() -> None:
    app()
