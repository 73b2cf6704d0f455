"""Every setting of a settings model, found by walking its fields: nested sections, named entries
(``[backends.<name>]``) and each variant of a ``type``-discriminated union. The configuration reference is generated
from it, and the loader uses it to tell a setting's environment variable from a secret's."""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from keybroker.config.sections import SecretSource

ENV_PREFIX = "KEYBROKER_"
NAME = "<name>"  # the path segment of a named entry (a backend's name)


@dataclass(frozen=True)
class Table:
    """A group of settings: a section, or one variant (``type = "..."``) of a named entry or an inline table."""

    path: tuple[str, ...]  # ("backends", "<name>") for [backends.<name>]; () for the top level
    model: type[BaseModel]
    variant: tuple[tuple[str, str], ...] = ()  # (table, type) of each choice on the way: ("backends.<name>", "vault")
    field: FieldInfo | None = None  # the field it is the value of (None for the top level)


@dataclass(frozen=True)
class Setting:
    """One setting: a value in TOML, one environment variable (two for a secret source: ``__ENV`` or ``__FILE``)."""

    table: Table
    key: tuple[str, ...]  # relative to the table: ("auth", "method")
    field: FieldInfo
    annotation: Any  # without None and Annotated

    @property
    def path(self) -> tuple[str, ...]:
        return (*self.table.path, *self.key)

    @property
    def secret_source(self) -> bool:
        return self.annotation is SecretSource

    @property
    def variables(self) -> tuple[str, ...]:
        base = ENV_PREFIX + "__".join(part.upper() for part in self.path)
        return (f"{base}__ENV", f"{base}__FILE") if self.secret_source else (base,)


def strip_optional(annotation: Any) -> Any:
    """The annotation without ``None`` (an unset optional setting is shown as such by its default)."""
    if get_origin(annotation) in {Union, types.UnionType}:
        members = [member for member in get_args(annotation) if member is not type(None)]
        if len(members) < len(get_args(annotation)):
            return members[0] if len(members) == 1 else Union[tuple(members)]  # noqa: UP007 - built at run time
    return annotation


def variants(annotation: Any) -> list[type[BaseModel]] | None:
    """The models of a union of models (each ``Annotated[Model, Tag(...)]``), else None."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) not in {Union, types.UnionType}:
        return None
    members = [get_args(member)[0] if get_origin(member) is Annotated else member for member in get_args(annotation)]
    return members if all(_is_model(member) for member in members) else None


def variant_name(model: type[BaseModel]) -> str:
    """The ``type`` a variant of a union is chosen by."""
    choices = get_args(model.model_fields["type"].annotation)
    return str(choices[0]) if choices else str(model.model_fields["type"].default)


def named_entries(annotation: Any) -> Any | None:
    """The value type of a ``dict[str, ...]`` of models (named entries such as backends), else None."""
    if get_origin(annotation) is dict:
        value = get_args(annotation)[1]
        if _is_model(value) or variants(value) is not None:
            return value
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not SecretSource


def _tables(table: Table) -> Iterator[tuple[Table, list[Setting]]]:
    """``table`` with its settings, then the tables below it (sections, named entries, variants)."""
    own: list[Setting] = []
    below: list[Table] = []

    def choices_at(path: tuple[str, ...], annotation: Any, field: FieldInfo) -> list[Table]:
        found = variants(annotation)
        if found is None:
            return [Table(path, annotation, table.variant, field)]
        where = ".".join(path)
        return [Table(path, choice, (*table.variant, (where, variant_name(choice))), field) for choice in found]

    def visit(model: type[BaseModel], key: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            annotation = strip_optional(field.annotation)
            here = (*key, name)
            entries = named_entries(annotation)
            if variants(annotation) is not None:
                own.append(Setting(table, here, field, annotation))  # the inline table itself: its `type` chooses
                below.extend(choices_at((*table.path, *here), annotation, field))
            elif entries is not None:
                below.extend(choices_at((*table.path, *here, NAME), entries, field))
            elif _is_model(annotation) and not table.path and not key:
                below.append(Table(here, annotation, field=field))  # a top-level section
            elif _is_model(annotation):
                visit(annotation, here)  # a nested table (a Vault connection's auth): its keys stay in this table
            else:
                own.append(Setting(table, here, field, annotation))

    visit(table.model, ())
    yield table, own
    for sub in below:
        yield from _tables(sub)


@cache
def catalog(model: type[BaseModel]) -> tuple[tuple[Table, tuple[Setting, ...]], ...]:
    """Every table of ``model`` (the top-level settings class) with its settings, in declaration order."""
    return tuple((table, tuple(settings)) for table, settings in _tables(Table((), model)))


def settings_of(model: type[BaseModel]) -> Iterator[Setting]:
    for _, settings in catalog(model):
        yield from settings


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """``parts`` is ``pattern`` or its beginning, any non-empty name standing for ``<name>``."""
    return len(parts) <= len(pattern) and all(
        part == want or (want == NAME and bool(part)) for part, want in zip(parts, pattern[: len(parts)], strict=True)
    )


def is_setting_variable(model: type[BaseModel], name: str, *, sections: bool = False) -> bool:
    """Whether ``name`` is the environment variable of a setting (a secret source's ``__ENV``/``__FILE`` included;
    any name in place of ``<NAME>``). ``sections``: a section or named entry given whole (as JSON) counts too."""
    if not name.upper().startswith(ENV_PREFIX):
        return False
    parts = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
    return any(
        _matches(parts, tuple(variable[len(ENV_PREFIX) :].lower().split("__")))
        and (sections or len(parts) == len(variable[len(ENV_PREFIX) :].split("__")))
        for setting in settings_of(model)
        for variable in setting.variables
    )


def is_setting_path(model: type[BaseModel], path: tuple[str, ...], types_given: dict[str, str] | None = None) -> bool:
    """Whether the TOML ``path`` (``("backends", "kms", "wrapper", "pin", "env")``) is a setting or a table holding
    settings; ``types_given`` maps a table (``"backends.kms.wrapper"``) to the ``type`` chosen there, where known."""
    given = types_given or {}
    for setting in settings_of(model):
        ends = [(*setting.path, "env"), (*setting.path, "file")] if setting.secret_source else [setting.path]
        for end in ends:
            if _matches(path, end) and all(_chosen(where, kind, path, given) for where, kind in setting.table.variant):
                return True
    return False


def _chosen(where: str, kind: str, path: tuple[str, ...], given: dict[str, str]) -> bool:
    """Whether the variant of type ``kind`` at ``where`` (a table pattern) agrees with the types given."""
    parts = where.split(".")
    concrete = ".".join(path[i] if part == NAME and i < len(path) else part for i, part in enumerate(parts))
    return given.get(concrete, kind) == kind


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    return get_args(annotation) if get_origin(annotation) is Literal else None
