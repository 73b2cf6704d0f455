"""``keybroker demo``: the whole story in one command, against a real server process on this machine.

Each step says what it does as it starts (a spinner on a terminal, a plain line when piped) and what it got when it
is done. However a demo ends (success, a failed step, Ctrl-C, SIGTERM), it stops the processes it started and
removes the directory it made, which holds a master key and an admin token, unless ``--dir`` asked to keep it
(then it says where it is). ``Session`` does that for both demos (``demo_nginx`` uses it too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx
import typer
from rich.text import Text

from keybroker.cli import output
from keybroker.cli.common import handled

MRENCLAVE = bytes.fromhex("c0ffee" * 10 + "c0ff")
OTHER = bytes.fromhex("bad0" * 16)


class Stopped(BaseException):
    """SIGINT or SIGTERM during a demo, raised where the demo is. A BaseException, as KeyboardInterrupt is: nothing
    on the way catches it, and every clean-up on the way runs (SIGTERM's default would end the process without any)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Session:
    """One run of a demo: its directory and the processes it started, undone in reverse order however the run ends.

    The first SIGINT or SIGTERM unwinds the run (``Stopped``); signals that come while it unwinds or cleans up are
    ignored, so that the clean-up is never cut short. At the end it says whether it removed or kept the directory.
    A run ended by a signal exits with 128 + its number (130, 143)."""

    def __init__(self) -> None:
        self.cleanups = contextlib.ExitStack()
        self.base: Path | None = None
        self.keep = False
        self._unwinding = False
        self._waiting: threading.Event | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Session:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._unwinding:
            return
        self._unwinding = True
        if self._waiting is not None:
            self._waiting.set()
        else:
            raise Stopped(signum)

    def wait(self, message: str) -> None:
        """Say ``message``, then wait for SIGINT or SIGTERM: the way a demo that keeps serving is meant to end (a
        success, not an interruption; a signal while it says so counts too)."""
        self._waiting = threading.Event()
        output.stderr.print(message)
        self._waiting.wait()

    def directory(self, base: Path, *, keep: bool) -> Path:
        """``base`` is the demo's: removed at the end unless ``keep`` (which may still be changed)."""
        self.base, self.keep = base, keep
        self.cleanups.callback(self._remove, base)
        return base

    def _remove(self, base: Path) -> None:
        if not self.keep:
            shutil.rmtree(base)

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv``; it is stopped (SIGTERM, SIGKILL after 20 s) at the end."""
        started: list[subprocess.Popen[bytes]] = []
        self.cleanups.callback(_stop, name, started)  # before it starts: no moment where it runs unrecorded
        started.append(subprocess.Popen(argv, **kwargs))  # noqa: S603 - argv fixed by the caller
        return started[0]

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._unwinding = True
        try:
            self.cleanups.close()
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        if self.base is not None:
            kept = f"its files are in {self.base} (with the demo's master key and admin token)"
            if exc is None or (isinstance(exc, typer.Exit) and exc.exit_code == 0):
                message = f"done; {kept}" if self.keep else f"done; removed {self.base}"
            else:
                message = "stopped what the demo started" + (f"; {kept}" if self.keep else f" and removed {self.base}")
            output.stderr.print(f"interrupted ({exc}): {message}" if isinstance(exc, Stopped) else message)
        if isinstance(exc, Stopped):
            raise typer.Exit(128 + exc.signum) from None


def _stop(name: str, started: list[subprocess.Popen[bytes]]) -> None:
    for process in started:
        if process.poll() is not None:
            continue
        with step(f"stopping {name} (pid {process.pid})"):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _say(f"{name} stopped")


@contextlib.contextmanager
def step(doing: str) -> Iterator[None]:
    """Say that ``doing`` starts: on a terminal a spinner while it runs (gone when it ends), otherwise one plain line
    ("  doing...": no control characters, one line per step, for logs)."""
    if sys.stdout.isatty():
        with output.stdout.status(Text(f"{doing}…"), spinner="dots"):
            yield
    else:
        output.stdout.print(Text(f"  {doing}..."), soft_wrap=True)
        yield


def _say(done: str) -> None:
    """What a step did (never folded, never read as markup: paths and ids go in as they are)."""
    output.stdout.print(Text.assemble(("▶", "bold cyan"), " ", done), soft_wrap=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    """This process's environment without the user's KEYBROKER_* settings: the demo's server is its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}


def _keybroker(*args: str, env: dict[str, str]) -> None:
    """``keybroker ARGS`` in a new process of this interpreter. A failure ends the demo with what it wrote on stderr
    (never its stdout: ``init`` prints the admin token there)."""
    command = [sys.executable, "-m", "keybroker", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)  # noqa: S603 - fixed argv
    except subprocess.TimeoutExpired:
        output.say("Error:", f"keybroker {' '.join(args[:2])} did not finish in 300 s")
        raise typer.Exit(1) from None
    if result.returncode != 0:
        output.say("Error:", f"keybroker {' '.join(args[:2])} failed (exit {result.returncode})")
        for line in result.stderr.strip().splitlines()[-10:]:
            output.stderr.print(f"    {line}")
        raise typer.Exit(1)


def _log_problem(log: Path) -> str:
    """What the server's log says went wrong: its error events, else its last lines."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("level") in {"error", "critical"}:
                errors.append(str(record.get("event")))
    return "; ".join(errors[-3:] or lines[-3:]) or "its log is empty"


@dataclass
class DemoServer:
    """A keybroker server process trusting a simulated TEE, with its collateral imported."""

    base: Path
    sim: Path
    data: Path
    url: str
    admin: httpx.Client

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """An admin request's JSON answer; anything but a success ends the demo with the server's problem."""
        try:
            response = self.admin.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            output.say("Error:", f"{method} {path}: {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:300]
            output.say("Error:", f"{method} {path}: HTTP {response.status_code}: {detail}")
            raise typer.Exit(1)
        return response.json()


def _wait_until_serving(server: subprocess.Popen[bytes], admin: httpx.Client, log: Path) -> None:
    deadline = time.monotonic() + 60
    while server.poll() is None and time.monotonic() < deadline:
        try:
            if admin.get("/healthz", timeout=2).status_code == 200:  # short: whatever else holds the port is mute
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    why = f"exited (status {server.returncode})" if server.poll() is not None else "did not answer in 60 s"
    output.say("Error:", f"keybroker {why}: {_log_problem(log)}")
    raise typer.Exit(1)


def _loopback_without_proxy() -> None:
    """The demo talks to its own server on loopback (the admin client, the client library, its subprocesses): never
    through HTTPS_PROXY/HTTP_PROXY, which the environment may name for the network outside."""
    for name in ("NO_PROXY", "no_proxy"):
        given = [entry for entry in os.environ.get(name, "").split(",") if entry.strip()]
        os.environ[name] = ",".join([*given, *(h for h in ("127.0.0.1", "localhost", "::1") if h not in given)])


def demo_server(session: Session, base: Path, port: int = 0) -> DemoServer:
    """``sim init`` + collateral, ``keybroker init`` and ``serve`` on ``port`` (default: a free one), the collateral
    imported; the server is stopped when ``session`` ends."""
    from keybroker.attestation.collateral import bundle_upload

    _loopback_without_proxy()

    sim, data = base / "sim", base / "data"
    plain = _environment()
    env = {**plain, "KEYBROKER_ATTESTATION__SIMULATED_ROOT": str(sim / "root-ca.pem")}
    with step(f"creating a simulated TEE and its collateral in {sim}"):
        _keybroker("sim", "init", str(sim), env=plain)
        _keybroker("sim", "collateral", str(sim), "--out", str(sim / "collateral"), env=plain)
    _say(f"simulated TEE and collateral in {sim}")
    with step(f"keybroker init --data-dir {data} (database, master key, service CA, admin token)"):
        _keybroker("init", "--data-dir", str(data), env=env)
    _say(f"keybroker init --data-dir {data}")
    port = port or _free_port()
    url = f"https://127.0.0.1:{port}"
    log = base / "server.log"
    with step(f"starting keybroker on {url}"):
        with log.open("wb") as sink:
            server = session.popen(
                "keybroker",
                [sys.executable, "-m", "keybroker", "serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}"],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )
        ca = ssl.create_default_context(cafile=str(data / "ca.pem"))
        token = (data / "admin-token").read_text().strip()
        admin = session.cleanups.enter_context(
            httpx.Client(
                base_url=url,
                verify=ca,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
                trust_env=False,  # (its own server on loopback: never through HTTPS_PROXY, nor with .netrc)
            )
        )
        _wait_until_serving(server, admin, log)
    _say(f"keybroker serving on {url} (pid {server.pid}; trusting the simulated TEE, with a warning in its log)")
    running = DemoServer(base, sim, data, url, admin)
    with step("importing the simulated platform's collateral"):
        for tee in ("sgx", "tdx"):
            running.call("POST", "/collateral/v1/items", json={"items": bundle_upload(sim / "collateral" / tee)})
    _say("imported the simulated platform's collateral")
    return running


@handled
def demo(directory: Path | None = None, port: int = 0) -> None:
    """Start keybroker with a simulated TEE, release an AES-256 and an RSA-3072 key to an attested workload,
    and show a workload with another MRENCLAVE refused, with its reasons. ``directory``: keep everything there
    (default: a new temp dir, removed at the end); ``port``: keybroker's (default: a free one)."""
    with Session() as session:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        base = session.directory(
            directory or Path(tempfile.mkdtemp(prefix="keybroker-demo-")), keep=directory is not None
        )
        _say(f"the demo's files: {base}")
        handled(_story)(session, base, port)  # a failed step says why before the clean-up


def _story(session: Session, base: Path, port: int) -> None:  # noqa: PLR0915 - a narrative, step by step
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keybroker_client import Client, ProblemError
    from keybroker_client.evidence import SimulatedEvidence

    running = demo_server(session, base, port)
    sim, data, url = running.sim, running.data, running.url
    policy_document = {
        "attestation_type": "SGX",
        "allow_simulated": True,
        "sgx": {"attributes": {"mrenclave": [MRENCLAVE.hex()], "isvsvn": 1}},
    }
    with step("creating the key transfer policy"):
        policy = running.call("POST", "/kbs/v1/key-transfer-policies", json=policy_document)["id"]
    _say(f"transfer policy {policy}: SGX, MRENCLAVE {MRENCLAVE.hex()[:16]}…, ISVSVN ≥ 1, simulated allowed")
    keys = {}
    for algorithm, length in (("AES", 256), ("RSA", 3072)):
        with step(f"creating the {algorithm}-{length} key"):
            keys[algorithm] = running.call(
                "POST",
                "/kbs/v1/keys",
                json={
                    "key_information": {"algorithm": algorithm, "key_length": length},
                    "transfer_policy_id": policy,
                    "label": f"demo-{algorithm.lower()}",
                },
            )["id"]
        _say(f"generated {algorithm}-{length} key {keys[algorithm]} inside keybroker")
    # The service side encrypts a message with each key (as an application in the private cloud would).
    from keybroker.config import load_settings
    from keybroker.services import build_services

    message = b"the launch codes are 0000"
    with step("the service side encrypts a message with each key"):
        services = build_services(load_settings(data_dir=data))
        try:
            aes = services.keys.load_material(services.keys.get(keys["AES"])).secret
            rsa_der = services.keys.load_material(services.keys.get(keys["RSA"])).secret
        finally:
            services.close()
        nonce = os.urandom(12)
        sealed = AESGCM(aes).encrypt(nonce, message, None)
        rsa_public = serialization.load_der_private_key(rsa_der, password=None).public_key()
        assert isinstance(rsa_public, rsa.RSAPublicKey)
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        rsa_sealed = rsa_public.encrypt(message, oaep)
        del aes, rsa_der
    workload = SimulatedEvidence(sim, "sgx", mrenclave=MRENCLAVE, isvsvn=1)
    with Client(url, ca=data / "ca.pem") as client:
        with step(f"the workload (MRENCLAVE {MRENCLAVE.hex()[:16]}…) attests and asks for both keys"):
            released_aes = client.fetch_key(keys["AES"], workload)
            released_rsa = client.fetch_key(keys["RSA"], workload, mode="passport")
        opened = AESGCM(released_aes.key).decrypt(nonce, sealed, None)
        private = serialization.load_der_private_key(released_rsa.key, password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        opened_rsa = private.decrypt(rsa_sealed, oaep)
        _say(
            f"workload (MRENCLAVE {MRENCLAVE.hex()[:16]}…) attested and received both keys; with them it "
            f"decrypted {opened.decode()!r} (AES-GCM) and {opened_rsa.decode()!r} (RSA-OAEP)"
        )
        try:
            with step(f"a second workload (MRENCLAVE {OTHER.hex()[:16]}…) asks for the AES key"):
                client.fetch_key(keys["AES"], SimulatedEvidence(sim, "sgx", mrenclave=OTHER, isvsvn=1))
            output.say("the second workload was not refused")
            raise typer.Exit(1)
        except ProblemError as refusal:
            reasons = ", ".join(f"{r['code']}: {r['detail']}" for r in refusal.problem.reasons)
            _say(f"a second workload (MRENCLAVE {OTHER.hex()[:16]}…) was refused: {refusal.code} ({reasons})")
    audit = running.call("GET", "/kbs/v1/audit", params={"target": keys["AES"]})
    _say("audit trail of the AES key: " + json.dumps([(e["action"], e["outcome"]) for e in audit]))
