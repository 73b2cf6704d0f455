"""Configuration: file < environment < explicit overrides; every problem named; nothing read globally."""

from __future__ import annotations

from pathlib import Path

import pytest

from keybroker.config import load_settings
from keybroker.errors import ConfigurationError


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
    monkeypatch.setenv("KEYBROKER_BACKENDS__EMBEDDED__WRAPPER__MASTER_KEY", "c2VjcmV0" * 5)
    settings = load_settings(data_dir=tmp_path)
    wrapper = settings.backends["embedded"].wrapper
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


def test_every_toml_block_of_the_readme_is_a_valid_configuration(tmp_path: Path) -> None:
    """The backend sections' configurations work as written (paths and credentials are only read when used)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 6
    kinds: set[str] = set()
    for number, block in enumerate(blocks):
        path = tmp_path / f"block{number}.toml"
        path.write_text(block)
        settings = load_settings(data_dir=tmp_path / "data", config_file=path)
        for backend in settings.backends.values():
            kinds.add(backend.type)
            wrapper = getattr(backend, "wrapper", None)
            if wrapper is not None:
                kinds.add(wrapper.type)
    assert {"embedded", "vault", "kmip", "local", "vault-transit", "pkcs11"} <= kinds
