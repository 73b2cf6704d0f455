"""Options and helpers shared by the CLI's command modules."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar
from urllib.parse import quote

import typer
from typer.core import TyperGroup, TyperOption

from keybroker.cli import output
from keybroker.cli.http import DEFAULT_ADDR, AdminApi, Connection
from keybroker.cli.output import Output

P = ParamSpec("P")
R = TypeVar("R")

DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", envvar="KEYBROKER_DATA_DIR", metavar="DIR", help="Data directory (database, master key)."
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="KEYBROKER_CONFIG",
        metavar="FILE",
        help="TOML settings (default: keybroker.toml in the data directory).",
    ),
]
# The options that find the server have a panel of their own in the help: at 60 columns the command's own options
# and these (with their long KEYBROKER_* names) no longer share one table's narrow columns.
CONNECTION = "Connection"
Addr = Annotated[
    str,
    typer.Option(
        "--addr", envvar="KEYBROKER_ADDR", metavar="URL", help="The keybroker server.", rich_help_panel=CONNECTION
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="KEYBROKER_TOKEN",
        metavar="TOKEN",
        help="Bearer token (from 'keybroker token create').",
        show_default=False,  # (never the variable's value)
        rich_help_panel=CONNECTION,
    ),
]
CaCert = Annotated[
    str | None,
    typer.Option(
        "--cacert",
        envvar="KEYBROKER_CACERT",
        metavar="FILE",
        help="CA certificate (PEM) to verify the server.",
        rich_help_panel=CONNECTION,
    ),
]
CaPin = Annotated[
    str | None,
    typer.Option(
        "--ca-fingerprint",
        envvar="KEYBROKER_CA_FINGERPRINT",
        metavar="HASH",
        help="Trust the server's CA only if its SHA-384 is HASH (several, comma-separated, during a CA "
        "rotation; see 'keybroker ca fingerprint').",
        show_default=False,
        rich_help_panel=CONNECTION,
    ),
]
OutputOpt = Annotated[
    Output,
    typer.Option("--output", "-o", metavar="FORMAT", help="table (for people), json, or id (only ids, for scripts)."),
]


class PlainWhenPiped(TyperGroup):
    """typer's own errors (an unknown option, a missing argument, a BadParameter) as plain lines when stderr is not
    a terminal: rich draws them in a box that wraps and cuts long messages at the terminal's width ("..."), and
    scripts read them. On a terminal they keep rich's box.

    And flags without a type: typer 0.29's rich help writes ``<bool>`` beside every flag (``--help``, ``--all``), as
    if it took a value. Each command is mended when it is looked up, so lazily loaded groups stay unloaded."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        self.rich_markup_mode = "rich" if sys.stderr.isatty() else None
        return super().main(*args, **kwargs)

    def get_params(self, ctx: Any) -> Any:
        return _untyped_flags(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _untyped_flags_under(command)
        return command


def _untyped_flags(params: list[Any]) -> list[Any]:
    """An empty metavar for every flag: rich then shows no type beside it (the plain help never does)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


def _untyped_flags_under(command: Any) -> None:
    """The flags of ``command``, its help option and those of its subcommands (typer built them all already)."""
    _untyped_flags(command.get_params(typer.Context(command, **command.context_settings)))
    for subcommand in getattr(command, "commands", {}).values():
        _untyped_flags_under(subcommand)


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Turn keybroker's and the server's errors, and files that cannot be used, into one readable line and a
    non-zero exit (1; 2 for a configuration error)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            code = _explain(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None

    return wrapper


def _explain(exc: Exception) -> int | None:
    """Say what went wrong and return the exit code, or None for an exception that is not one of these (typer's own
    exits and usage errors go on to typer; anything else is a bug and keeps its traceback)."""
    if isinstance(exc, typer.Exit | typer.Abort | typer.TyperException):
        return None
    # (Imported here: the client library brings httpx, which a local command or a help page does not need.)
    from keybroker.errors import ConfigurationError, KeybrokerError
    from keybroker_client import KeybrokerClientError, ProblemError

    if isinstance(exc, ProblemError):
        output.say("Error:", output.printable(exc.problem.describe()))  # (a server's text: no escape sequences)
        return 1
    if isinstance(exc, ConfigurationError):
        output.say("Configuration error:", exc.detail)
        return 2
    if isinstance(exc, KeybrokerError | KeybrokerClientError | FileProblem):
        message = str(exc)
        if isinstance(exc, KeybrokerError) and exc.instance_code == "database_unavailable" and exc.__cause__:
            from keybroker.storage.db import database_reason

            message += f": {database_reason(exc.__cause__)}"  # an operator at the console may see why
        output.say("Error:", message)
        return 1
    if isinstance(exc, OSError):  # a file that cannot be used where no helper below names it
        where = f" {exc.filename}" if exc.filename else ""
        output.say("Error:", f"cannot use{where}: {_reason(exc)}")
        return 1
    return None


# --- files ------------------------------------------------------------------------------------------------------
# Every file and directory a command reads or writes goes through these: a missing or unreadable one, a directory
# where a file is expected (or the reverse), or text that is not UTF-8 is one line naming it and why, exit 1.


class FileProblem(Exception):
    """A file or directory argument that cannot be used; the message names it and says why."""


def _shown(path: Path) -> str:
    return "stdin" if str(path) == "-" else str(path)


def _reason(exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return "it is a directory, not a file"
    if isinstance(exc, NotADirectoryError):
        return "a part of the path is a file, not a directory"
    return exc.strerror or type(exc).__name__


def read_bytes(path: Path) -> bytes:
    """The content of the file ``path`` (``-``: stdin)."""
    if str(path) == "-":
        return typer.get_binary_stream("stdin").read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileProblem(f"cannot read {path}: {_reason(exc)}") from None


def read_text(path: Path, kind: str = "text") -> str:
    """The content of the file ``path`` (``-``: stdin) as UTF-8 text; ``kind`` names what it should hold."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileProblem(
            f"cannot read {_shown(path)}: it is not UTF-8 {kind} (byte {exc.start} is {data[exc.start]:#04x})"
        ) from None


def input_dir(path: Path) -> Path:
    """``path``, an existing directory to read."""
    if not path.exists():
        raise FileProblem(f"cannot read {path}: no such directory")
    if not path.is_dir():
        raise FileProblem(f"cannot read {path}: it is a file, not a directory")
    return path


def output_file(path: Path, force: bool | None = None) -> Path:
    """``path``, checked before any work is done: a file that can be created or replaced (not a directory, in an
    existing directory); with ``force`` given (a command's --force), an existing path (or a symlink) only with it."""
    if path.is_dir():
        raise FileProblem(f"cannot write {path}: it is a directory; give a file name")
    if force is False and (path.exists() or path.is_symlink()):
        raise FileProblem(f"cannot write {path}: it exists already; pass --force to replace it")
    _parent_exists(path)
    return path


def output_dir(path: Path) -> Path:
    """``path``, checked before any work is done: an existing directory, or one that can be created (with its
    missing parents)."""
    for place in (path, *path.absolute().parents):
        if place.exists():
            if not place.is_dir():
                where = "it is" if place == path else f"{place} is"
                raise FileProblem(f"cannot write into {path}: {where} a file, not a directory")
            break
    return path


def _parent_exists(path: Path) -> None:
    parent = path.absolute().parent
    if not parent.is_dir():
        missing = "is a file, not a directory" if parent.exists() else "does not exist"
        raise FileProblem(f"cannot write {path}: the directory {parent} {missing}")


def write_file(path: Path, data: str | bytes, replace: bool | None = None) -> None:
    """Write ``data`` (text as UTF-8) to ``path``. With ``replace`` given, a symlink is never followed: False
    creates a new file only (an existing path, a symlink above all, is refused); True writes a temporary file in the
    same directory and renames it over ``path`` (the link itself is replaced, never its target)."""
    content = data.encode() if isinstance(data, str) else data
    try:
        if replace is None:
            path.write_bytes(content)
        elif replace:
            _replace_atomically(path, content)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as file:
                file.write(content)
    except FileExistsError:
        raise FileProblem(f"cannot write {path}: it exists already; pass --force to replace it") from None
    except OSError as exc:
        raise FileProblem(f"cannot write {path}: {_reason(exc)}") from None


def _replace_atomically(path: Path, content: bytes) -> None:
    import tempfile

    fd, temporary = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # (a certificate chain: public)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def connect(addr: str, token: str | None, cacert: str | None, ca_fingerprint: str | None) -> AdminApi:
    if token is not None and not (token.isascii() and token.isprintable()):  # (it goes into an HTTP header)
        raise typer.BadParameter(
            "a token is printable ASCII: this one holds a line break or other characters (copy it again)",
            param_hint="--token / KEYBROKER_TOKEN",
        )
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
