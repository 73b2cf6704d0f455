"""Configuration: file < environment < explicit overrides; every problem named; nothing read globally."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from keybroker.config import (
    EmbeddedBackendSettings,
    LocalWrapperSettings,
    Pkcs11WrapperSettings,
    Settings,
    load_settings,
)
from keybroker.config import reference as configuration_reference
from keybroker.config.catalog import is_setting_path, is_setting_variable, settings_of
from keybroker.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[2]


def _embedded(settings: Settings) -> EmbeddedBackendSettings:
    backend = settings.backends["embedded"]
    assert isinstance(backend, EmbeddedBackendSettings)
    return backend


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.server.listen == "127.0.0.1:9443"
    assert settings.server.port == 9443
    assert settings.data_dir == tmp_path.resolve()
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'keybroker.db'}"
    assert list(settings.backends) == ["embedded"]


def test_precedence_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keybroker.toml").write_text(
        '[server]\nlisten = "127.0.0.1:1000"\nmax_body_bytes = 4096\n[logging]\nlevel = "debug"\n'
    )
    settings = load_settings(data_dir=tmp_path)  # DATA_DIR/keybroker.toml is read when present
    assert (settings.server.listen, settings.server.max_body_bytes, settings.logging.level) == (
        "127.0.0.1:1000",
        4096,
        "debug",
    )
    monkeypatch.setenv("KEYBROKER_SERVER__LISTEN", "127.0.0.1:2000")
    settings = load_settings(data_dir=tmp_path)
    assert settings.server.listen == "127.0.0.1:2000"
    assert settings.server.max_body_bytes == 4096  # nested values merge, they do not replace the section
    settings = load_settings(data_dir=tmp_path, overrides={"server": {"listen": "127.0.0.1:3000"}})
    assert settings.server.listen == "127.0.0.1:3000"
    assert settings.server.max_body_bytes == 4096


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_DATA_DIR", str(tmp_path / "d"))
    assert load_settings().data_dir == (tmp_path / "d").resolve()


def test_master_key_from_environment_is_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = base64.b64encode(b"secret" * 5 + b"!!").decode()  # (32 bytes: serve refuses any other length)
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", key)
    settings = load_settings(data_dir=tmp_path)
    wrapper = _embedded(settings).wrapper
    assert isinstance(wrapper, LocalWrapperSettings)
    assert wrapper.master_key is not None
    assert "c2VjcmV0" not in repr(settings)
    assert "c2VjcmV0" not in str(settings.redacted())


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[server]\nlisten = "nonsense"\n', {}, "server.listen"),
        ('[server]\nlisten = "127.0.0.1:99999"\n', {}, "HOST:PORT"),
        ('[server]\nlistne = "127.0.0.1:1"\n', {}, "server.listne: Extra inputs"),
        ("[sever]\n", {}, "sever: Extra inputs"),
        ('[keys]\ndefault_backend = "vault"\n', {}, "'vault' is not among the configured backends"),
        ('[backends.x]\ntype = "nope"\n', {}, "backends.x"),
        ("", {"KEYBROKER_SERVER__MAX_BODY_BYTES": "12"}, "server.max_body_bytes"),
        ("", {"KEYBROKER_LOGGING__LEVEL": "loud"}, "logging.level"),
        ("not toml = = =", {}, "not valid TOML"),
    ],
)
def test_invalid_settings_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "custom.toml"
    config.write_text(toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(data_dir=tmp_path, config_file=config)
    assert message in caught.value.detail


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(data_dir=tmp_path, config_file=tmp_path / "absent.toml")


def test_misspelt_environment_names_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_SERVR__LISTEN", "127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="KEYBROKER_SERVR__LISTEN"):
        load_settings(data_dir=tmp_path)
    monkeypatch.delenv("KEYBROKER_SERVR__LISTEN")
    for client_variable in ("KEYBROKER_ADDR", "KEYBROKER_TOKEN", "KEYBROKER_CACERT", "KEYBROKER_CA_FINGERPRINT"):
        monkeypatch.setenv(client_variable, "x")
    assert load_settings(data_dir=tmp_path).server.listen == "127.0.0.1:9443"


def test_database_password_is_not_displayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_DATABASE__URL", "postgresql+psycopg://kbs:S3cretPW@db/kbs")
    shown = load_settings(data_dir=tmp_path).redacted()
    assert "S3cretPW" not in str(shown)
    assert shown["database"]["url"] == "postgresql+psycopg://kbs:***@db/kbs"


PKCS11 = (
    '[backends.embedded]\ntype = "embedded"\nwrapper = {{ type = "pkcs11", module = "/usr/lib/softhsm/libsofthsm2.so", '
    'token_label = "keybroker", pin = {{ env = "{variable}" }} }}\n'
)


def _pkcs11(tmp_path: Path, variable: str) -> Path:
    config = tmp_path / "keybroker.toml"
    config.write_text(PKCS11.format(variable=variable))
    return config


def test_a_variable_a_secret_source_names_is_that_secret_not_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's PKCS#11 example: pin = { env = "KEYBROKER_HSM_PIN" } with KEYBROKER_HSM_PIN set (it was refused
    as an unknown setting)."""
    monkeypatch.setenv("KEYBROKER_HSM_PIN", "1234")
    settings = load_settings(data_dir=tmp_path, config_file=_pkcs11(tmp_path, "KEYBROKER_HSM_PIN"))
    wrapper = _embedded(settings).wrapper
    assert isinstance(wrapper, Pkcs11WrapperSettings)
    assert settings.read_secret(wrapper.pin, "PIN") == "1234"
    assert "1234" not in repr(settings)
    assert "1234" not in str(settings.redacted())


def test_a_misspelt_setting_beside_a_secret_variable_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYBROKER_HSM_PIN", "1234")
    monkeypatch.setenv("KEYBROKER_SERVR__LISTEN", "127.0.0.1:1")
    with pytest.raises(ConfigurationError, match=r"unknown setting.*: KEYBROKER_SERVR__LISTEN \(") as caught:
        load_settings(data_dir=tmp_path, config_file=_pkcs11(tmp_path, "KEYBROKER_HSM_PIN"))
    assert "KEYBROKER_HSM_PIN" not in caught.value.detail.split("(")[0]  # only the misspelt one is named


def test_a_secret_variable_nothing_names_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYBROKER_HSM_PIN", "1234")
    with pytest.raises(ConfigurationError, match=r"unknown setting.*KEYBROKER_HSM_PIN"):
        load_settings(data_dir=tmp_path)  # no configuration names it
    with pytest.raises(ConfigurationError, match=r"unknown setting.*KEYBROKER_HSM_PIN"):
        load_settings(data_dir=tmp_path, config_file=_pkcs11(tmp_path, "KEYBROKER_HSM_PIN2"))  # another name


def test_secret_sources_in_the_environment_and_the_overrides_name_variables_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYBROKER_DATABASE__URL", "postgresql://kb@db.example/kb")
    monkeypatch.setenv("KEYBROKER_DATABASE__PASSWORD__ENV", "KEYBROKER_DB_PASSWORD")
    monkeypatch.setenv("KEYBROKER_DB_PASSWORD", "S3cret")
    settings = load_settings(data_dir=tmp_path)
    assert settings.database_url == "postgresql+psycopg://kb:S3cret@db.example/kb"
    assert "S3cret" not in str(settings.redacted())
    monkeypatch.delenv("KEYBROKER_DATABASE__PASSWORD__ENV")
    with pytest.raises(ConfigurationError, match="KEYBROKER_DB_PASSWORD"):
        load_settings(data_dir=tmp_path)
    overrides = {"database": {"password": {"env": "KEYBROKER_DB_PASSWORD"}}}
    assert "S3cret" in load_settings(data_dir=tmp_path, overrides=overrides).database_url


def test_a_secret_variable_in_the_settings_names_is_not_parsed_as_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEYBROKER_BACKENDS__EMBEDDED__PIN would be read as a setting of backend "embedded" (and refused as an extra
    key, or its value decoded as JSON): named as a secret, pydantic-settings never sees it."""
    value = '{"type": "kmip", "S3cretPIN": 1}'
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__PIN", value)
    settings = load_settings(data_dir=tmp_path, config_file=_pkcs11(tmp_path, "KEYBROKER_BACKENDS__EMBEDDED__PIN"))
    wrapper = _embedded(settings).wrapper
    assert isinstance(wrapper, Pkcs11WrapperSettings)
    assert settings.read_secret(wrapper.pin, "PIN") == value
    monkeypatch.setenv("KEYBROKER_LOGGING__LEVEL", "loud")  # another problem: its message never shows the secret
    with pytest.raises(ConfigurationError) as caught:
        load_settings(data_dir=tmp_path, config_file=_pkcs11(tmp_path, "KEYBROKER_BACKENDS__EMBEDDED__PIN"))
    assert "logging.level" in caught.value.detail
    assert "S3cretPIN" not in caught.value.detail
    assert "backends.embedded.pin" not in caught.value.detail


def test_a_setting_variable_cannot_be_a_secret_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which would KEYBROKER_SERVER__LISTEN be, the PIN or the address? Refused, naming both."""
    monkeypatch.setenv("KEYBROKER_SERVER__LISTEN", "127.0.0.1:1234")
    for variable in ("KEYBROKER_SERVER__LISTEN", "KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY"):
        with pytest.raises(ConfigurationError) as caught:
            load_settings(data_dir=tmp_path, config_file=_pkcs11(tmp_path, variable))
        assert caught.value.detail.startswith(
            f"backends.embedded.wrapper.pin: {variable} is the environment variable of a setting"
        )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("KEYBROKER_SERVER", "not json", "KEYBROKER_SERVER (or one of its KEYBROKER_SERVER__* variables) is not valid"),
        ("KEYBROKER_TLS__SAN", "kb.example", "KEYBROKER_TLS (or one of its KEYBROKER_TLS__* variables) is not valid"),
    ],
)
def test_a_variable_that_is_not_json_where_json_is_needed_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match="JSON") as caught:  # (was pydantic-settings' SettingsError)
        load_settings(data_dir=tmp_path)
    assert message in caught.value.detail
    assert value not in caught.value.detail


def test_the_catalog_knows_every_variable_and_path() -> None:
    assert is_setting_variable(Settings, "KEYBROKER_BACKENDS__KMS__WRAPPER__PIN__ENV")
    assert is_setting_variable(Settings, "KEYBROKER_BACKENDS__<NAME>__AUTH__SECRET_ID__FILE")
    assert not is_setting_variable(Settings, "KEYBROKER_BACKENDS__KMS__WRAPPER__PIN")  # a table: __ENV or __FILE
    assert not is_setting_variable(Settings, "KEYBROKER_SERVER")
    assert is_setting_variable(Settings, "KEYBROKER_SERVER", sections=True)
    assert not is_setting_variable(Settings, "KEYBROKER_HSM_PIN")
    assert is_setting_path(Settings, ("backends", "v", "auth", "token", "env"), {"backends.v": "vault"})
    assert not is_setting_path(Settings, ("backends", "v", "auth", "token", "env"), {"backends.v": "kmip"})
    assert not is_setting_path(Settings, ("backends", "e", "wrapper", "pin"), {"backends.e.wrapper": "local"})
    assert len(list(settings_of(Settings))) >= 90


def test_the_configuration_reference_is_the_models() -> None:
    """docs/configuration.md is generated from the settings models; a field added, renamed or described anew
    without regenerating it fails here."""
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert configuration_reference.render() == committed, (
        f"docs/configuration.md is out of date with src/keybroker/config/: run `.venv/bin/"
        f"{configuration_reference.COMMAND}` and commit the result"
    )
    for setting in settings_of(Settings):
        for variable in setting.variables:
            assert f"`{variable}`" in committed, variable


def test_every_setting_has_a_description(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference refuses a field without one (its meaning would be a blank cell)."""
    field = Settings.model_fields["data_dir"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(ValueError, match="data_dir has no description"):
        configuration_reference.render()


@pytest.mark.parametrize(
    ("backend", "says"),
    [
        ({"type": "vault", "url": "https://admin:Pa55word@vault.example:8200", "auth": {"token": {"env": "VT"}}},
         "credentials go in auth"),
        ({"type": "vault", "url": "https://vault.example:8200", "addresses": ["https://u:Pa55word@v2.example:8200"],
          "auth": {"token": {"env": "VT"}}}, "credentials go in auth"),
        ({"type": "vault", "url": "https://Pa55word@vault.example:8200", "auth": {"token": {"env": "VT"}}},
         "must not hold a user name or password"),
        ({"type": "kmip", "host": "u:Pa55word@kmip.example", "cert_file": "c.pem", "key_file": "k.pem",
          "ca_file": "ca.pem"}, "no scheme or user:pass@"),
    ],
)  # fmt: skip
def test_a_url_with_userinfo_is_refused_without_echoing_it(tmp_path: Path, backend: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as refused:
        load_settings(data_dir=tmp_path, overrides={"backends": {"embedded": {"type": "embedded"}, "kms": backend}})
    assert "Pa55word" not in str(refused.value)
    assert "Pa55word" not in repr(refused.value)


def test_a_transit_url_with_userinfo_is_refused(tmp_path: Path) -> None:
    url = "https://u:Pa55word@vault.example:8200"
    wrapper = {"type": "vault-transit", "url": url, "auth": {"token": {"env": "VT"}}}
    with pytest.raises(ConfigurationError, match="credentials go in auth") as refused:
        load_settings(data_dir=tmp_path, overrides={"backends": {"embedded": {"type": "embedded", "wrapper": wrapper}}})
    assert "Pa55word" not in str(refused.value)


def test_a_database_password_in_the_query_string_is_hidden(tmp_path: Path) -> None:
    url = "postgresql://kb@db.example/kb?sslmode=require&password=Qu3rySecret"
    shown = load_settings(data_dir=tmp_path, overrides={"database": {"url": url}}).redacted()
    assert "Qu3rySecret" not in str(shown)
    assert "sslmode=require" in shown["database"]["url"]
    assert "password=%2A%2A%2A" in shown["database"]["url"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("not base64!!", "not valid base64"),
        ("c2VjcmV0", "6 bytes once decoded from base64, not 32"),
        ("A" * 60, "45 bytes once decoded from base64, not 32"),
    ],
)
def test_a_master_key_from_the_environment_is_32_bytes_of_base64(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", value)
    with pytest.raises(ConfigurationError, match=says) as refused:
        load_settings(data_dir=tmp_path)
    assert value not in str(refused.value)
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", base64.b64encode(b"k" * 32).decode())
    load_settings(data_dir=tmp_path)
