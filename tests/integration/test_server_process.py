"""The real ``keybroker serve`` process driven over HTTP, as clients and scripts see it."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import EXAMPLE_POLICY
from tests.integration.conftest import Server, stop


def test_keys_and_policies_over_http(server: Server) -> None:
    with server.client() as client:
        assert client.get("/version").json()["name"] == "keybroker"
        policy = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY)
        assert policy.status_code == 201, policy.text
        policy_id = policy.json()["id"]
        created = []
        for info in (
            {"algorithm": "AES", "key_length": 192},
            {"algorithm": "RSA", "key_length": 4096},
            {"algorithm": "EC", "curve_type": "secp521r1"},
        ):
            response = client.post("/kbs/v1/keys", json={"key_information": info, "transfer_policy_id": policy_id})
            assert response.status_code == 201, response.text
            assert response.json()["transfer_link"].startswith(server.url)
            created.append(response.json()["id"])
        assert [k["id"] for k in client.get("/kbs/v1/keys").json()] == created
        refused = client.delete(f"/kbs/v1/key-transfer-policies/{policy_id}")
        assert (refused.status_code, refused.json()["code"]) == (409, "policy_in_use")
        assert refused.headers["content-type"] == "application/problem+json"
        for key_id in created:
            assert client.delete(f"/kbs/v1/keys/{key_id}").status_code == 204
        assert client.delete(f"/kbs/v1/key-transfer-policies/{policy_id}").status_code == 204
    anonymous = httpx.get(f"{server.url}/kbs/v1/keys", verify=server.verify())
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized")


def test_data_directory_permissions(server: Server) -> None:
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    for name in ("master.key", "admin-token", "keybroker.db", "ca.pem", "tls/server-key.pem"):
        assert stat.S_IMODE((server.data_dir / name).stat().st_mode) == 0o600, name
    # The CA keys live in the database, wrapped by the KEK; nothing else of them is on disk.
    assert not list(server.data_dir.glob("*ca-key.pem"))
    assert not (server.data_dir / "tls-passphrase.wrapped").exists()


def test_rsa_7680_generation_does_not_block_other_requests(server: Server) -> None:
    with server.client() as client:
        policy_id = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]
    slow: dict[str, httpx.Response] = {}

    def create_7680() -> None:
        with server.client() as client:
            slow["response"] = client.post(
                "/kbs/v1/keys",
                json={"key_information": {"algorithm": "RSA", "key_length": 7680}, "transfer_policy_id": policy_id},
            )

    worker = threading.Thread(target=create_7680)
    worker.start()
    served_meanwhile = 0
    with server.client() as client:
        time.sleep(0.3)  # let the generation start
        while worker.is_alive() and served_meanwhile < 20:
            response = client.post(
                "/kbs/v1/keys",
                json={"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy_id},
            )
            assert response.status_code == 201
            assert client.get("/healthz").status_code == 200
            served_meanwhile += 1
        generation_still_running = worker.is_alive()
    worker.join(timeout=300)
    assert slow["response"].status_code == 201, slow["response"].text
    assert slow["response"].json()["key_information"]["key_length"] == 7680
    # Other requests completed while the RSA-7680 key was still being generated.
    assert served_meanwhile == 20
    assert generation_still_running


def test_restart_keeps_keys_and_init_is_idempotent(server: Server, tmp_path: Path) -> None:
    import subprocess
    import sys

    with server.client() as client:
        policy_id = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]
        key = client.post(
            "/kbs/v1/keys",
            json={"key_information": {"algorithm": "AES", "key_length": 256}, "transfer_policy_id": policy_id},
        ).json()
    stop(server.process)
    token_before = (server.data_dir / "admin-token").read_text()
    again = subprocess.run(
        [sys.executable, "-m", "keybroker", "init", "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout == ""  # the token is printed once, on the first init only
    assert "already initialised" in again.stderr
    assert (server.data_dir / "admin-token").read_text() == token_before

    from tests.integration.conftest import start_server

    restarted = start_server(server.data_dir)
    try:
        with restarted.client() as client:
            assert client.get(f"/kbs/v1/keys/{key['id']}").json() == json.loads(json.dumps(key)) | {
                "transfer_link": f"{restarted.url}/kbs/v1/keys/{key['id']}/transfer"
            }
    finally:
        stop(restarted.process)


def test_serve_refuses_an_uninitialised_data_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(  # noqa: PLW1510 - the exit status is asserted below
        [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "keybroker init" in result.stderr


def test_a_body_cut_off_midway_is_never_acted_on(server: Server) -> None:
    import socket
    import ssl as ssl_module

    with server.client() as client:
        policy_id = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]
    body = json.dumps(
        {
            "key_information": {"algorithm": "AES", "key_length": 256},
            "transfer_policy_id": policy_id,
            "label": "truncated",
        }
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    head = (
        f"POST /kbs/v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body) + 500}\r\n\r\n"
    ).encode()
    context = ssl_module.create_default_context(cafile=str(server.ca_file))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head + body)  # a complete JSON document, but 500 bytes short of what was announced
        time.sleep(0.5)
    time.sleep(0.5)
    with server.client() as client:
        assert client.get("/kbs/v1/keys").json() == []
        assert client.get("/healthz").status_code == 200


def test_several_worker_processes_share_one_deployment(tmp_path: Path) -> None:
    from tests.integration.conftest import start_server

    server = start_server(tmp_path / ".data", KEYBROKER_SERVER__WORKERS="2")
    try:
        with server.client() as client:
            policy_id = client.post("/kbs/v1/key-transfer-policies", json=EXAMPLE_POLICY).json()["id"]
            created = {
                client.post(
                    "/kbs/v1/keys",
                    json={"key_information": {"algorithm": "AES", "key_length": 128}, "transfer_policy_id": policy_id},
                ).json()["id"]
                for _ in range(20)
            }
            assert {k["id"] for k in client.get("/kbs/v1/keys").json()} == created
        children = [
            p
            for p in Path("/proc").glob("[0-9]*/stat")
            if p.read_text().rpartition(")")[2].split()[1] == str(server.process.pid)
        ]
        assert len(children) >= 2  # the worker processes
    finally:
        stop(server.process)
    from keybroker.audit.chain import verify_chain
    from keybroker.config import load_settings
    from keybroker.services import build_services

    services = build_services(load_settings(data_dir=server.data_dir))
    try:
        head = services.audit.head()
        assert verify_chain(services.audit.entries(limit=1000), *head).ok  # both processes appended to one chain
    finally:
        services.close()
