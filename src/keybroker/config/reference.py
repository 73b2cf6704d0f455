"""The configuration reference, generated from the settings models: every setting with its environment variable,
type, default and meaning. ``python -m keybroker.config.reference > docs/configuration.md`` refreshes the committed
copy (a unit test fails when it drifts from the models)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from keybroker.config import Settings
from keybroker.config.catalog import NAME, Setting, Table, catalog, literal_choices, variants

COMMAND = "python -m keybroker.config.reference > docs/configuration.md"

INTRODUCTION = """\
# Configuration reference

<!-- Generated from the settings models in src/keybroker/config/ by
     `{command}`: do not edit by hand. -->

Every setting keybroker reads, generated from the settings models themselves. Settings come from one TOML file
(`DATA_DIR/keybroker.toml` when present, or `--config FILE`) and `KEYBROKER_*` environment variables; the
command-line flags (`--data-dir`, `--listen`, `--workers`, `--role`) come first, then the environment, then the file,
then the defaults. A nested key's variable joins its path with double underscores (`[server] listen` is
`KEYBROKER_SERVER__LISTEN`), `<NAME>` standing for a backend's name (`[backends.vault]` is
`KEYBROKER_BACKENDS__VAULT__...`); lists and tables are given in JSON
(`KEYBROKER_TLS__SAN='["kb-1.example", "localhost"]'`). Unknown keys and unknown `KEYBROKER_*` variables are
errors, so a misspelt setting never falls back to its default; `keybroker config check` shows the effective
settings, secrets hidden. Relative paths are taken from the data directory.

**Secrets** never go into the file. A *secret source* says where one is: `{{ env = "VARIABLE" }}`, read from that
variable when the secret is used, or `{{ file = "PATH" }}`, a file of keybroker's user with mode 0600 (a trailing
newline is ignored); in the environment, `..._PIN__ENV=VARIABLE` or `..._PIN__FILE=PATH`. The variable may be a
`KEYBROKER_*` name (`pin = {{ env = "KEYBROKER_HSM_PIN" }}`): a variable that a secret source names is that secret,
never a setting, and a setting's own variable cannot be named.
"""


def _markdown(text: str) -> str:
    """A docstring or description as Markdown on one line: ``literals`` as `code`, ``<`` outside code escaped
    (``<NAME>`` would be read as an HTML tag)."""
    parts = re.sub(r"``([^`]+)``", r"`\1`", " ".join(text.split())).split("`")
    return "`".join(part if index % 2 else part.replace("<", "&lt;") for index, part in enumerate(parts))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, BaseModel) and "type" in type(value).model_fields:
        return f'{{ type = "{value.model_dump()["type"]}" }}'  # a variant left at its default: its type says it all
    raise TypeError(f"no TOML rendering for a default of type {type(value).__name__}")


def _default(setting: Setting) -> str:
    field = setting.field
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return f"`{extra['shown_default']}`"
    if field.default_factory is not None:
        return f"`{_toml(field.default_factory())}`"  # type: ignore[call-arg]  # factories here take no argument
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    return f"`{_toml(field.default)}`"


_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    SecretStr: "string (secret)",
    list[str]: "list of strings",
}


def _type(setting: Setting) -> str:
    annotation = setting.annotation
    choices = literal_choices(annotation)
    if setting.secret_source:
        name = "secret source"
    elif choices is not None:
        name = " or ".join(f"`{_toml(choice)}`" for choice in choices)
    elif variants(annotation) is not None:
        name = "inline table (see below)"
    else:
        name = _NAMES[annotation]
    bounds = []
    for item in setting.field.metadata:
        if isinstance(item, annotated_types.Ge):
            bounds.append(f">= {item.ge}")
        if isinstance(item, annotated_types.Gt):
            bounds.append(f"> {item.gt}")
        if isinstance(item, annotated_types.Le):
            bounds.append(f"<= {item.le}")
        if isinstance(item, annotated_types.Lt):
            bounds.append(f"< {item.lt}")
        if isinstance(item, annotated_types.MinLen):
            bounds.append(f"at least {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            bounds.append(f"at most {item.max_length}")
    return f"{name}, {', '.join(bounds)}" if bounds else name


def _heading(table: Table) -> str:
    if not table.path:
        return "## Top level"
    where = ".".join(table.path)
    depth = len(table.variant)
    if not table.variant:
        return f"## `[{where}]`"
    parent, _, key = where.rpartition(".")
    kind = table.variant[-1][1]
    if NAME in key or depth == 1:
        return f'{"#" * (depth + 1)} `[{where}]` with `type = "{kind}"`'
    return f'{"#" * (depth + 1)} `{key} = {{ type = "{kind}", ... }}` in `[{parent}]`'


def _ordered(settings: tuple[Setting, ...]) -> list[Setting]:
    return sorted(settings, key=lambda setting: setting.key != ("type",))  # the type first, then as declared


def _table(table: Table, settings: tuple[Setting, ...]) -> Iterator[str]:
    yield _heading(table)
    yield ""
    if table.model.__doc__:
        yield _markdown(table.model.__doc__.strip().split("\n\n")[0])
        yield ""
    yield "| Key | Environment variable | Type | Default | Meaning |"
    yield "| --- | --- | --- | --- | --- |"
    for setting in _ordered(settings):
        if not setting.field.description:
            raise ValueError(f"{'.'.join(setting.path)} has no description: give its Field one")
        variables = "<br>".join(f"`{name}`" for name in setting.variables)
        yield (
            f"| `{'.'.join(setting.key)}` | {variables} | {_cell(_type(setting))} | {_cell(_default(setting))} "
            f"| {_cell(_markdown(setting.field.description))} |"
        )
    yield ""


def render() -> str:
    lines = [INTRODUCTION.format(command=COMMAND)]
    tables = catalog(Settings)
    for table, _ in tables:
        indent = "  " * max(len(table.variant) - 1, 0)
        lines.append(f"{indent}- [{_heading(table).lstrip('# ')}](#{_anchor(table)})")
    lines.append("")
    introduced: set[tuple[str, ...]] = set()
    for table, settings in tables:
        if table.variant and table.path not in introduced and table.field is not None and table.field.description:
            lines += [f"`{'.'.join(table.path)}`: {_markdown(table.field.description)}. One table per `type`:", ""]
            introduced.add(table.path)
        lines.extend(_table(table, settings))
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(table: Table) -> str:
    """GitHub's anchor of the table's heading: lowercase, punctuation dropped, spaces as hyphens."""
    text = _heading(table).lstrip("# ").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


if __name__ == "__main__":
    sys.stdout.write(render())
