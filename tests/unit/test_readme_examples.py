"""Every configuration example the documents show, as written and with the environment they show beside it,
through the real settings loader (``load_settings``): TOML blocks of README.md, docs/*.md and deploy/README.md, the
deploy/*.toml files, and every ``KEYBROKER_*=`` assignment. An unknown or misspelt key, a variable the loader
refuses and a variable it silently ignores all fail here. (Paths and credentials are only read when used, so the
examples load on any machine.)"""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from keybroker.config import CLIENT_VARIABLES, SecretSource, Settings, load_settings
from keybroker.config.catalog import catalog, is_setting_path, is_setting_variable
from keybroker.errors import ConfigurationError
from tests.unit.docs_examples import FRAGMENT, REPO, Block, assignments, blocks, documents, inline_code, where

TOML_BLOCKS = [block for path in documents() for block in blocks(path) if block.language == "toml"]
WHOLE = [block for block in TOML_BLOCKS if block.marker != FRAGMENT]
DEPLOY = sorted((REPO / "deploy").glob("*.toml"))


@dataclass(frozen=True)
class EnvironmentExample:
    where: str
    variables: dict[str, str]
    config: str | None  # the TOML it goes with: its section's block, or the file it is written in


def _section_config(path: Path, section: str) -> str | None:
    same = [block.text for block in WHOLE if block.path == path and block.section == section]
    return same[0] if len(same) == 1 else None


def _environment_examples() -> Iterator[EnvironmentExample]:
    for path in documents():
        for block in blocks(path):
            if block.language != "toml" and (shown := assignments(block.text)):
                yield EnvironmentExample(block.where, shown, _section_config(path, block.section))
        for line, section, code in inline_code(path):
            if shown := assignments(code):
                yield EnvironmentExample(where(path, line), shown, _section_config(path, section))
    for path in DEPLOY:
        if shown := assignments(path.read_text()):
            yield EnvironmentExample(str(path.relative_to(REPO)), shown, path.read_text())


ENVIRONMENT = list(_environment_examples())


# A value the shell computes (``"$(base64 -w0 < master.key)"``) stands for one the setting accepts.
COMPUTED = {"MASTER_KEY": base64.b64encode(bytes(range(32))).decode()}


def _load(tmp_path: Path, config: str | None, variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, given in variables.items():
        computed = next((sample for suffix, sample in COMPUTED.items() if name.endswith(suffix)), given)
        monkeypatch.setenv(name, computed if given.startswith("$") else given)
    file = None
    if config is not None:
        file = tmp_path / "keybroker.toml"
        file.write_text(config)
    data_dir = None if "KEYBROKER_DATA_DIR" in variables else tmp_path / "data"
    return load_settings(data_dir=data_dir, config_file=file)


def _secret_sources(value: Any) -> Iterator[SecretSource]:
    if isinstance(value, SecretSource):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_sources(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _secret_sources(item)


@pytest.mark.parametrize("block", WHOLE, ids=[block.where for block in WHOLE])
def test_every_toml_block_loads_with_its_environment(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(tmp_path, block.text, assignments_beside(block), monkeypatch)


def assignments_beside(block: Block) -> dict[str, str]:
    """The KEYBROKER_* assignments shown in the same section as ``block`` (the PIN's export beside the PKCS#11
    example)."""
    shown: dict[str, str] = {}
    for other in blocks(block.path):
        if other.section == block.section and other.language != "toml":
            shown.update(assignments(other.text))
    return shown


@pytest.mark.parametrize("path", DEPLOY, ids=[path.name for path in DEPLOY])
def test_every_deploy_configuration_loads(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _load(tmp_path, path.read_text(), {}, monkeypatch)


@pytest.mark.parametrize("example", ENVIRONMENT, ids=[example.where for example in ENVIRONMENT])
def test_every_environment_example_is_accepted_and_read(
    example: EnvironmentExample, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded with its configuration; each setting's variable changes the settings (it was read, not ignored);
    any other variable is the CLI's or a secret that a secret source of the configuration names, and holds it."""
    settings = _load(tmp_path, example.config, example.variables, monkeypatch)
    named = {source.env: source for source in _secret_sources(settings) if source.env is not None}
    for name, value in example.variables.items():
        if is_setting_variable(Settings, name, sections=True):
            monkeypatch.delenv(name)
            without = _load(tmp_path, example.config, {}, monkeypatch)
            monkeypatch.setenv(name, value)
            assert without.model_dump(mode="json") != settings.model_dump(mode="json"), f"{name} was not read"
        elif name not in CLIENT_VARIABLES:
            assert name in named, f"{name} is no setting, not the CLI's, and no secret source names it"
            assert settings.read_secret(named[name], name) == value


def test_the_environment_examples_are_found() -> None:
    """(So that the parametrised tests above cannot pass on nothing.)"""
    names = {name for example in ENVIRONMENT for name in example.variables}
    assert {"KEYBROKER_HSM_PIN", "KEYBROKER_TOKEN", "KEYBROKER_SERVER__LISTEN", "KEYBROKER_DATABASE__URL"} <= names
    assert any(example.where.startswith("deploy/keybroker.toml") for example in ENVIRONMENT)
    assert len(WHOLE) >= 6


def _commented_settings(block_text: str) -> Iterator[tuple[tuple[str, ...], dict[str, str]]]:
    """(path, types given) of each setting in a commented-out line (``# url = "..."``, ``# or: auth = {...}``):
    alternatives are examples too. Comment lines that are not TOML are prose."""
    given = _types(tomllib.loads(block_text))
    table: tuple[str, ...] = ()
    for raw in block_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            table = tuple(line.strip("[] ").split("#")[0].strip("[] ").split("."))
        if not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().removeprefix("or:").strip()
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue
        for path in _paths(parsed):
            yield (*table, *path), given


def _paths(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _types(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, str]:
    """Each table's chosen ``type`` (``{"backends.vault": "vault"}``)."""
    found = {".".join(prefix): str(values["type"])} if isinstance(values.get("type"), str) and prefix else {}
    for key, value in values.items():
        if isinstance(value, dict):
            found.update(_types(value, (*prefix, key)))
    return found


def test_every_commented_out_setting_and_fragment_key_is_real() -> None:
    texts = [(block.where, block.text) for block in TOML_BLOCKS]
    texts += [(str(path.relative_to(REPO)), path.read_text()) for path in DEPLOY]
    problems = [
        f"{shown}: {'.'.join(path)} is not a setting"
        for shown, text in texts
        for path, given in _commented_settings(text)
        if not is_setting_path(Settings, path, given)
    ]
    fragments = [block for block in TOML_BLOCKS if block.marker == FRAGMENT]
    problems += [
        f"{block.where}: {'.'.join(path)} is not a setting"
        for block in fragments
        for path in _paths(tomllib.loads(block.text))
        if not is_setting_path(Settings, path, _types(tomllib.loads(block.text)))
    ]
    assert not problems, "\n".join(problems)
    assert sum(1 for _, text in texts for _ in _commented_settings(text)) >= 10  # found some


def test_a_misspelt_commented_out_setting_fails_the_check() -> None:
    text = (
        '[backends.vault]\ntype = "vault"\nurl = "https://v:8200"\n# failover_secs = 10\n# or: auth = { methd = "x" }\n'
    )
    wrong = [path for path, given in _commented_settings(text) if not is_setting_path(Settings, path, given)]
    assert wrong == [("backends", "vault", "failover_secs"), ("backends", "vault", "auth", "methd")]


def test_every_backend_and_wrapper_type_has_a_readme_example(tmp_path: Path) -> None:
    kinds = {kind for table, _ in catalog(Settings) for _, kind in table.variant}
    shown: set[str] = set()
    for number, block in enumerate(block for block in WHOLE if block.path.name == "README.md"):
        path = tmp_path / f"block{number}.toml"
        path.write_text(block.text)
        for backend in load_settings(data_dir=tmp_path / "data", config_file=path).backends.values():
            shown.add(backend.type)
            wrapper = getattr(backend, "wrapper", None)
            if wrapper is not None:
                shown.add(wrapper.type)
    assert kinds == {"embedded", "vault", "kmip", "local", "vault-transit", "pkcs11"}
    assert kinds <= shown


@pytest.mark.parametrize(
    ("line", "wrong"),
    [
        ('wrapper = { type = "pkcs11",', 'wrapper = { type = "pkcs11", key_lable = "x",'),
        ("kv_version = 1", "kv_versoin = 1"),
        ("[limits]", "[limit]"),
    ],
)
def test_a_misspelt_key_in_a_readme_block_fails_the_load(
    line: str, wrong: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = next(block for block in WHOLE if line in block.text and block.path.name == "README.md")
    with pytest.raises(ConfigurationError, match="Extra inputs are not permitted"):
        _load(tmp_path, block.text.replace(line, wrong, 1), assignments_beside(block), monkeypatch)


def test_an_environment_example_refused_or_ignored_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PKCS#11 example's PIN variable without the block that names it is refused; a misspelt setting is too."""
    block = next(block for block in WHOLE if "KEYBROKER_HSM_PIN" in block.text)
    assert assignments_beside(block) == {"KEYBROKER_HSM_PIN": "1234"}
    with pytest.raises(ConfigurationError, match=r"unknown setting.*KEYBROKER_HSM_PIN"):
        _load(tmp_path, None, {"KEYBROKER_HSM_PIN": "1234"}, monkeypatch)
    monkeypatch.delenv("KEYBROKER_HSM_PIN")
    with pytest.raises(ConfigurationError, match="KEYBROKER_SERVR__LISTEN"):
        _load(tmp_path, block.text, {"KEYBROKER_HSM_PIN": "1234", "KEYBROKER_SERVR__LISTEN": "x:1"}, monkeypatch)
