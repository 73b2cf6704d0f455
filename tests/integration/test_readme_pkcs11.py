"""The README's PKCS#11 example as written: its TOML block in keybroker.toml, its shell block (a SoftHSM2 token,
``export KEYBROKER_HSM_PIN=1234``, ``keybroker init``) run by bash, then ``serve`` "the same way". The PIN's variable
is a KEYBROKER_* name that a secret source names: it is accepted as the PIN, never read as a setting, and a
misspelt setting beside it is still refused."""

from __future__ import annotations

import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EXAMPLE_POLICY, REPO
from tests.integration.conftest import clean_env, stop, wait_until_serving
from tests.peers.process import free_port

pytestmark = pytest.mark.integration

README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def _section(heading: str) -> str:
    start = README.index(f"\n### {heading}\n")
    end = README.find("\n#", start + 1)
    return README[start:end]


SECTION = _section("PKCS#11 HSM as the KEK")
BLOCKS = dict(re.findall(r"```(toml|bash)\n(.*?)```", SECTION, re.S))
CONFIG = tomllib.loads(BLOCKS["toml"])
WRAPPER = CONFIG["backends"]["embedded"]["wrapper"]


def _init_command() -> list[str]:
    """The block's ``keybroker init`` line, as argv (its comment dropped)."""
    lines = [line for line in BLOCKS["bash"].splitlines() if line.startswith("keybroker init ")]
    assert len(lines) == 1, BLOCKS["bash"]
    return shlex.split(lines[0], comments=True)


def _token_directory(root: Path) -> Path:
    """A SoftHSM2 configuration of this test's own (given to the commands only: this process keeps the run's)."""
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def _run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=clean_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


KEK_PROBE = """
import json, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
module, token_label, pin, key_label = sys.argv[1:]
with pkcs11.lib(module).get_token(token_label=token_label).open(user_pin=pin) as session:
    keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label}))
    print(json.dumps([[k[Attribute.SENSITIVE], k[Attribute.EXTRACTABLE], k[Attribute.VALUE_LEN]] for k in keys]))
"""


def _keks(cwd: Path, conf: Path, pin: str) -> list[list[Any]]:
    """The token's keys under the configured KEK label: [sensitive, extractable, length] each."""
    probe = _run(
        [sys.executable, "-c", KEK_PROBE, WRAPPER["module"], WRAPPER["token_label"], pin, WRAPPER["key_label"]],
        cwd,
        SOFTHSM2_CONF=str(conf),
    )
    assert probe.returncode == 0, probe.stderr
    keks: list[list[Any]] = json.loads(probe.stdout)
    return keks


def test_the_readme_pkcs11_example_initialises_and_serves_as_written(tmp_path: Path) -> None:
    assert WRAPPER["type"] == "pkcs11"
    assert WRAPPER["pin"] == {"env": "KEYBROKER_HSM_PIN"}  # a KEYBROKER_* name: the case that was refused
    assert "export KEYBROKER_HSM_PIN=" in BLOCKS["bash"]
    conf = _token_directory(tmp_path / "softhsm")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keybroker.toml").write_text(BLOCKS["toml"])

    # The shell block, line by line as written (bash -e: any failing line fails the run).
    ran = _run(["bash", "-e", "-u", "-o", "pipefail", "-c", BLOCKS["bash"]], work, SOFTHSM2_CONF=str(conf))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr
    data_dir = work / _init_command()[_init_command().index("--data-dir") + 1]
    token = (data_dir / "admin-token").read_text().strip()
    assert token in ran.stdout  # printed once
    assert not (data_dir / "master.key").exists()  # the KEK is in the token, nowhere on disk
    pin = re.search(r"^export KEYBROKER_HSM_PIN=(\S+)", BLOCKS["bash"], re.M)
    assert pin is not None
    assert _keks(work, conf, pin.group(1)) == [[True, False, 32]]  # non-extractable, sensitive AES-256

    # "then serve the same way": the KEK from the token wraps a new key; /readyz says the backend serves.
    port = free_port()
    log = tmp_path / "serve.log"
    serve = [*_init_command()[:1], "serve", *_init_command()[2:], "--listen", f"127.0.0.1:{port}"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            serve,
            cwd=work,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(
                PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                SOFTHSM2_CONF=str(conf),
                KEYBROKER_HSM_PIN=pin.group(1),
            ),
        )
    try:
        verify = ssl.create_default_context(cafile=str(data_dir / "ca.pem"))
        url = f"https://127.0.0.1:{port}"
        wait_until_serving(url, process, log, verify)
        with httpx.Client(base_url=url, verify=verify, headers={"Authorization": f"Bearer {token}"}) as api:
            assert api.get("/readyz").status_code == 200
            policy = api.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY)
            assert policy.status_code == 201, policy.text
            info = {"algorithm": "AES", "key_length": 256}
            created = api.post(
                "/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy.json()["id"]}
            )
            assert created.status_code == 201, created.text
    finally:
        stop(process)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "PKCS#11 PIN: environment variable KEYBROKER_HSM_PIN is not set"),
        ({"KEYBROKER_HSM_PIN": "9999"}, "refused the PIN (PinIncorrect)"),
        (
            {"KEYBROKER_HSM_PIN": "1234", "KEYBROKER_SERVR__LISTEN": "127.0.0.1:1"},
            "unknown setting(s) in the environment: KEYBROKER_SERVR__LISTEN",
        ),
    ],
    ids=["pin-unset", "pin-wrong", "misspelt-setting-beside-it"],
)
def test_the_readme_pkcs11_example_refuses_with_its_reason(tmp_path: Path, env: dict[str, str], message: str) -> None:
    conf = _token_directory(tmp_path / "softhsm")
    work = tmp_path / "work"
    work.mkdir()
    (work / "keybroker.toml").write_text(BLOCKS["toml"])
    made = _run(
        ["softhsm2-util", "--init-token", "--free", "--label", WRAPPER["token_label"], "--so-pin", "87654321",
         "--pin", "1234"],
        work,
        SOFTHSM2_CONF=str(conf),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    refused = _run(_init_command(), work, SOFTHSM2_CONF=str(conf), **env)
    assert refused.returncode != 0
    assert message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1  # one clear line
    if env.get("KEYBROKER_HSM_PIN"):
        assert env["KEYBROKER_HSM_PIN"] not in refused.stderr  # the PIN is never echoed
    data_dir = work / _init_command()[_init_command().index("--data-dir") + 1]
    assert not (data_dir / "admin-token").exists()  # no deployment was made
    assert _keks(work, conf, "1234") == []  # and no KEK
