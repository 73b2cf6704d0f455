"""Options and helpers shared by the CLI's command modules."""

from __future__ import annotations

import functools
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar
from urllib.parse import quote

import typer
from typer.core import TyperGroup

from keybroker.cli import output
from keybroker.cli.http import DEFAULT_ADDR, AdminApi, Connection
from keybroker.cli.output import Output
from keybroker.errors import ConfigurationError, KeybrokerError
from keybroker_client import KeybrokerClientError, ProblemError

P = ParamSpec("P")
R = TypeVar("R")

DataDir = Annotated[
    Path,
    typer.Option("--data-dir", envvar="KEYBROKER_DATA_DIR", help="Data directory (database, master key)."),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML configuration file (default: DATA_DIR/keybroker.toml).")
]
Addr = Annotated[str, typer.Option("--addr", envvar="KEYBROKER_ADDR", help="keybroker URL.")]
Token = Annotated[
    str | None, typer.Option("--token", envvar="KEYBROKER_TOKEN", help="Bearer token.", show_default=False)
]
CaCert = Annotated[
    str | None,
    typer.Option("--cacert", envvar="KEYBROKER_CACERT", help="CA certificate to verify the server."),
]
CaPin = Annotated[
    str | None,
    typer.Option(
        "--ca-fingerprint",
        envvar="KEYBROKER_CA_FINGERPRINT",
        help="Trust the server's CA only if its SHA-384 is this (see 'keybroker ca fingerprint').",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people; json or id (ids only) for scripts.")
]


class PlainWhenPiped(TyperGroup):
    """typer's own errors (an unknown option, a missing argument, a BadParameter) as plain lines when stderr is not
    a terminal: rich draws them in a box that wraps and cuts long messages at the terminal's width ("..."), and
    scripts read them. On a terminal they keep rich's box."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        self.rich_markup_mode = "rich" if sys.stderr.isatty() else None
        return super().main(*args, **kwargs)


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Turn keybroker's and the server's errors into a readable message and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ProblemError as exc:
            output.say("Error:", exc.problem.describe())
            raise typer.Exit(1) from None
        except ConfigurationError as exc:
            output.say("Configuration error:", exc.detail)
            raise typer.Exit(2) from None
        except (KeybrokerError, KeybrokerClientError) as exc:
            message = str(exc)
            if isinstance(exc, KeybrokerError) and exc.instance_code == "database_unavailable" and exc.__cause__:
                from keybroker.storage.db import database_reason

                message += f": {database_reason(exc.__cause__)}"  # an operator at the console may see why
            output.say("Error:", message)
            raise typer.Exit(1) from None
        except OSError as exc:  # a file argument that cannot be read or written
            where = f" {exc.filename}" if exc.filename else ""
            output.say("Error:", f"cannot use{where}: {exc.strerror or type(exc).__name__}")
            raise typer.Exit(1) from None

    return wrapper


def connect(addr: str, token: str | None, cacert: str | None, ca_fingerprint: str | None) -> AdminApi:
    return AdminApi(Connection(addr=addr, token=token, cacert=cacert, ca_fingerprint=ca_fingerprint))


_CONNECTION: dict[str, tuple[object, object]] = {
    "addr": (Addr, DEFAULT_ADDR),
    "token": (Token, None),
    "cacert": (CaCert, None),
    "ca_fingerprint": (CaPin, None),
}


def remote(func: Callable[..., R]) -> Callable[..., R]:
    """For a command whose first parameter is ``api: AdminApi``: adds the options that find the server
    (``--addr``, ``--token``, ``--cacert``, ``--ca-fingerprint`` and their ``KEYBROKER_*`` variables) and passes the
    connection they describe, so that no command declares them itself."""
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        parameter.replace(annotation=hints[parameter.name])
        for parameter in inspect.signature(func).parameters.values()
        if parameter.name != "api"
    ]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in _CONNECTION.items()
    ]

    def wrapper(**kwargs: Any) -> R:
        connection = {name: kwargs.pop(name) for name in _CONNECTION}
        return func(connect(**connection), **kwargs)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = func.__name__, func.__qualname__, func.__doc__
    wrapper.__module__ = func.__module__
    wrapper.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]  # read by typer
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    return wrapper


def segment(value: str) -> str:
    """A path segment, escaped: an id like ``../key-transfer-policies/X`` must not reach another resource."""
    if value in ("", ".", ".."):
        raise typer.BadParameter(f"{value!r} is not an id")
    return quote(value, safe="")
