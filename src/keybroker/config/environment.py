"""The ``KEYBROKER_*`` environment: which variables are settings, which belong to the CLI, and which hold a secret
that a ``{ env = "VAR" }`` source names (``pin = { env = "KEYBROKER_HSM_PIN" }``). A secret's variable is read only
by ``SecretReader``, when the secret is used: never as a setting, so its value cannot become one or reach a
validation message."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic_settings import BaseSettings, EnvSettingsSource
from pydantic_settings.exceptions import SettingsError

from keybroker.config.catalog import ENV_PREFIX, is_setting_variable
from keybroker.errors import ConfigurationError

# KEYBROKER_* variables that belong to the CLI, not to the service's settings.
CLIENT_VARIABLES = frozenset(
    {"KEYBROKER_ADDR", "KEYBROKER_TOKEN", "KEYBROKER_CACERT", "KEYBROKER_CA_FINGERPRINT", "KEYBROKER_CONFIG"}
)


class EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' environment source, blind to the variables named as secrets' sources."""

    def __init__(self, settings_cls: type[BaseSettings], secrets: frozenset[str]) -> None:
        self._secrets = frozenset(name.lower() for name in secrets)  # (it matches names case-insensitively)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        loaded = super()._load_env_vars()
        return {name: value for name, value in loaded.items() if name.lower() not in self._secrets}


def _references(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """(variable, where) for every ``{env = "VARIABLE"}`` in raw settings values (only secret sources have ``env``)."""
    if isinstance(value, Mapping):
        if isinstance(value.get("env"), str):
            yield value["env"], ".".join(path)
        for key, item in value.items():
            yield from _references(item, (*path, str(key)))


def secret_variables(
    settings_cls: type[BaseSettings], file_values: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, str]:
    """The variables that secret sources name, in the file, the overrides or the environment itself
    (``KEYBROKER_DATABASE__PASSWORD__ENV=PGPASS``), each with the setting that names it."""
    try:
        environment = EnvironmentSource(settings_cls, frozenset())()
    except SettingsError as exc:
        raise ConfigurationError(unparsable(exc)) from None
    found: dict[str, str] = {}
    for source in (file_values, overrides, environment):
        for name, where in _references(source):
            found.setdefault(name, where)
    return found


def check_environment_names(settings_cls: type[BaseSettings], secrets: Mapping[str, str]) -> None:
    """pydantic-settings ignores variables it has no field for; a misspelt KEYBROKER_SERVR__LISTEN must not fall back
    to the default silently, so unknown top-level names are errors (nested typos are caught by validation). A
    secret's variable is no setting, and may not be a setting's variable too (which would it be?)."""
    for name, where in sorted(secrets.items()):
        if is_setting_variable(settings_cls, name):
            raise ConfigurationError(
                f"{where}: {name} is the environment variable of a setting, so it cannot also hold this secret; "
                f"name another variable (e.g. KEYBROKER_{where.replace('.', '_').upper()})"
            )
    known = set(settings_cls.model_fields)
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in CLIENT_VARIABLES
        and name not in secrets
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in known
    )
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) in the environment: {', '.join(unknown)} (known sections: {', '.join(sorted(known))}; "
            'a secret\'s variable is accepted once a setting names it, as in pin = { env = "VARIABLE" })'
        )


def unparsable(exc: SettingsError) -> str:
    """pydantic-settings' message names the field but not the variable (and never the value)."""
    field = re.search(r'field "([^"]+)"', str(exc))
    name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else f"a {ENV_PREFIX}* variable"
    return (
        f"invalid configuration (KEYBROKER_* environment): {name} (or one of its {name}__* variables) is not valid "
        "JSON where a list or a table is expected"
    )
