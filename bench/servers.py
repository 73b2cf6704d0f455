"""Server CPU per HTTPS request of one tiny ASGI application under uvicorn (uvloop, httptools) and under granian.

Usage (from the repository root, with the project's venv; granian: ``.venv/bin/pip install granian``):

    .venv/bin/python bench/servers.py                                   # 16 clients, 5 s phases, 2 rounds
    .venv/bin/python bench/servers.py --duration 1 --rounds 1 --clients 4
    .venv/bin/python bench/servers.py --json                            # JSON on stdout, the table on stderr

A self-signed EC P-256 certificate (IP SAN 127.0.0.1) and its private key, PKCS#8 PEM encrypted with a password,
go into a temp dir. Each server runs the application of this file in its own subprocess (one worker, 127.0.0.1, a
free port): uvicorn as keybroker serves it (``loop="uvloop"``, ``http="httptools"``, ``ssl_keyfile_password``),
granian with ``interface="asgi"``, one worker, uvloop, HTTP/1 and ``ssl_key_password``. If granian does not come
up with the encrypted key, it is measured with a plaintext copy of the key, and the report says so: keybroker
could not adopt it that way. The application answers ``GET /healthz`` with ``{"status":"ok"}`` and ``POST /echo``
(an 8 KB body, the size of a key transfer request) with a 700-byte JSON body (a key transfer response).

Both servers run the whole time; phases alternate (uvicorn healthz, granian healthz, uvicorn echo, granian echo)
for ``--rounds`` rounds. In a phase ``--clients`` threads, each with one keep-alive ``http.client.HTTPSConnection``
(verified against the certificate, connected and warmed up before the phase starts), send requests back to back
for ``--duration`` seconds. Reported per server and route, the median over rounds: requests/s, p50/p99 ms, server
CPU µs per request (utime+stime of /proc/<pid>/stat summed over the server's process tree), and the ratio
granian/uvicorn of CPU per request. The clients share the CPUs with the server: compare servers, not capacity.
Exit status: 0 if every request succeeded, 1 if any failed, 2 on setup errors or when granian is not importable
(uvicorn is measured all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import SetupError, free_port, percentile, table

HEALTH_BODY = b'{"status":"ok"}'
REQUEST_BODY = json.dumps({"quote": "Q" * 8000, "nonce": "n" * 64}).encode()  # ~8 KB, a key transfer request
RESPONSE_PAD = "K" * 660  # a ~700-byte response, the wrapped key and its metadata
PASSWORD_ENV = "KEYBROKER_BENCH_KEY_PASSWORD"
ROUTES = {"healthz": ("GET", "/healthz", None), "echo": ("POST", "/echo", REQUEST_BODY)}
SERVERS = ("uvicorn", "granian")


async def app(
    scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    """The ASGI application both servers run."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    status, body = 404, b'{"detail":"Not Found"}'
    if scope["method"] == "GET" and scope["path"] == "/healthz":
        status, body = 200, HEALTH_BODY
    elif scope["method"] == "POST" and scope["path"] == "/echo":
        received, more = 0, True
        while more:
            message = await receive()
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        status, body = 200, json.dumps({"received": received, "wrapped_key": RESPONSE_PAD}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(server: str, port: int, cert: str, key: str) -> None:
    """The subprocess: serve ``app`` with ``server`` until terminated."""
    password = os.environ.get(PASSWORD_ENV) or None
    if server == "uvicorn":
        import uvicorn

        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ssl_certfile=cert,
            ssl_keyfile=key,
            ssl_keyfile_password=password,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_config=None,
        )
        uvicorn.Server(config).run()
        return
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    loop = Loops.uvloop if "uvloop" in {item.value for item in Loops} else Loops.auto
    Granian(
        "servers:app",
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=loop,
        http=HTTPModes.http1,
        ssl_cert=Path(cert),
        ssl_key=Path(key),
        ssl_key_password=password,
        working_dir=Path(__file__).resolve().parent,
    ).serve()


def make_tls(tmp: Path, password: bytes) -> tuple[Path, Path, Path]:
    """A self-signed EC P-256 certificate for 127.0.0.1 and its key, encrypted and plaintext (PKCS#8 PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    paths = tmp / "cert.pem", tmp / "key-encrypted.pem", tmp / "key-plain.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    paths[1].write_bytes(key.private_bytes(pem, pkcs8, serialization.BestAvailableEncryption(password)))
    paths[2].write_bytes(key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    return paths


def tree_cpu_seconds(root: int) -> float:
    """utime+stime (and those of reaped children) of ``root`` and all its descendants, from /proc/*/stat."""
    procs: dict[int, tuple[int, int]] = {}  # pid: (ppid, ticks)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            procs[int(stat.parent.name)] = int(fields[1]), sum(int(v) for v in fields[11:15])  # proc(5) fields 14-17
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, (0, 0))[1]
        todo += [child for child, (parent, _) in procs.items() if parent == pid]
    return total / os.sysconf("SC_CLK_TCK")


def probe(port: int, context: ssl.SSLContext) -> bool:
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().read() == HEALTH_BODY
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


@contextlib.contextmanager
def server_process(
    server: str, tmp: Path, cert: Path, key: Path, password: str | None, timeout: float = 20.0
) -> Iterator[tuple[int, int]]:
    """Start ``server`` in a subprocess; yields (pid, port) once /healthz answers; raises SetupError if it does not."""
    port, log_path = free_port(), tmp / f"{server}-{key.stem}.log"
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV} | ({PASSWORD_ENV: password} if password else {})
    command = [sys.executable, __file__, "--serve", server, "--port", str(port), "--cert", str(cert), "--key", str(key)]
    context = ssl.create_default_context(cafile=str(cert))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            while not probe(port, context):
                if process.poll() is not None or time.monotonic() > deadline:
                    lines = log_path.read_text(errors="replace").strip().splitlines() or ["(no output)"]
                    panic = [lines[i + 1] for i, line in enumerate(lines[:-1]) if "panicked at" in line]
                    raise SetupError(f"{server} with {key.name}: {(panic or lines[-3:])[0]}")
                time.sleep(0.2)
            yield process.pid, port
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the session it leads: its workers
                process.wait()


def phase(
    server: str, pid: int, port: int, route: str, context: ssl.SSLContext, clients: int, duration: float
) -> dict[str, Any]:
    """``clients`` keep-alive connections sending ``route`` back to back for ``duration`` s; latencies and CPU."""
    method, path, body = ROUTES[route]
    headers = {"Content-Type": "application/json"} if body else {}
    connections = [http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context) for _ in range(clients)]
    latencies: list[list[float]] = [[] for _ in connections]
    errors = [0] * clients
    for connection in connections:  # TLS handshake and one request outside the measurement
        connection.request(method, path, body=body, headers=headers)
        connection.getresponse().read()
    tls = "?"
    if isinstance(sock := connections[0].sock, ssl.SSLSocket) and (cipher := sock.cipher()):
        tls = f"{sock.version()} {cipher[0]}"
    start, end = threading.Barrier(clients + 1), [0.0]

    def worker(index: int) -> None:
        connection, out = connections[index], latencies[index]
        start.wait()
        while (started := time.perf_counter()) < end[0]:
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                good = response.status == 200
            except (OSError, http.client.HTTPException):
                good = False
                connection.close()  # reconnects on the next request
            if good:
                out.append((time.perf_counter() - started) * 1000)
            else:
                errors[index] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    cpu_before, began = tree_cpu_seconds(pid), time.perf_counter()
    end[0] = began + duration
    start.wait()
    for thread in threads:
        thread.join()
    seconds, cpu = time.perf_counter() - began, tree_cpu_seconds(pid) - cpu_before
    for connection in connections:
        connection.close()
    ordered = sorted(ms for per_thread in latencies for ms in per_thread)
    ok = len(ordered)
    return {
        "server": server,
        "route": route,
        "requests": ok,
        "errors": sum(errors),
        "seconds": round(seconds, 3),
        "per_second": round(ok / seconds, 1),
        "p50_ms": percentile(ordered, 50),
        "p99_ms": percentile(ordered, 99),
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_request": round(cpu * 1e6 / ok, 1) if ok else None,
        "tls": tls,
    }


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for server in SERVERS:
        for route in ROUTES:
            mine = [row for row in rows if row["server"] == server and row["route"] == route]
            if not mine:
                continue
            merged: dict[str, Any] = {"server": server, "route": route, "tls": mine[0]["tls"]}
            merged["errors"] = sum(row["errors"] for row in mine)
            for key in ("per_second", "p50_ms", "p99_ms", "cpu_us_per_request"):
                values = [row[key] for row in mine if row[key] is not None]
                merged[key] = round(statistics.median(values), 2) if values else None
            out.append(merged)
    return out


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    password = "bench-" + os.urandom(8).hex()
    cert, encrypted_key, plain_key = make_tls(tmp, password.encode())
    context = ssl.create_default_context(cafile=str(cert))  # check_hostname on: the IP SAN 127.0.0.1
    document: dict[str, Any] = {"clients": args.clients, "duration_s": args.duration, "rounds": args.rounds}
    document["versions"] = {name: metadata.version(name) for name in ("uvicorn", "uvloop", "httptools")}
    with contextlib.ExitStack() as stack:
        running = {"uvicorn": stack.enter_context(server_process("uvicorn", tmp, cert, encrypted_key, password))}
        try:
            import granian

            document["versions"]["granian"] = granian.__version__
        except ImportError as exc:
            document["granian_missing"] = f"{exc} (install it: .venv/bin/pip install granian)"
        else:
            try:
                running["granian"] = stack.enter_context(server_process("granian", tmp, cert, encrypted_key, password))
                document["granian_encrypted_key"] = {"accepted": True, "parameter": "ssl_key_password"}
            except SetupError as exc:
                document["granian_encrypted_key"] = {"accepted": False, "error": str(exc)}
                running["granian"] = stack.enter_context(server_process("granian", tmp, cert, plain_key, None))
        rows = [
            phase(server, *running[server], route, context, args.clients, args.duration)
            for _ in range(args.rounds)
            for route in ROUTES
            for server in SERVERS
            if server in running
        ]
    document["rounds_detail"] = rows
    document["results"] = median_rows(rows)
    cpu = {(row["server"], row["route"]): row["cpu_us_per_request"] for row in document["results"]}
    document["granian_over_uvicorn_cpu_per_request"] = {
        route: round(cpu[("granian", route)] / cpu[("uvicorn", route)], 2)
        for route in ROUTES
        if cpu.get(("granian", route)) and cpu.get(("uvicorn", route))
    }
    return document


def report(document: dict[str, Any]) -> str:
    keys = ("server", "route", "per_second", "p50_ms", "p99_ms", "cpu_us_per_request", "errors", "tls")
    columns = list(
        zip(keys, ("server", "route", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors", "TLS"), strict=True)
    )
    lines = [
        f"{document['clients']} clients, {document['duration_s']} s per phase, median of {document['rounds']} "
        f"round(s); " + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
        "",
        table(document["results"], columns),
        "",
    ]
    for route, ratio in document["granian_over_uvicorn_cpu_per_request"].items():
        lines.append(f"granian/uvicorn CPU per request, {route}: {ratio:.2f}")
    key = document.get("granian_encrypted_key")
    if key and key["accepted"]:
        lines.append("granian served the encrypted PKCS#8 key given ssl_key_password: keybroker could adopt it")
    elif key:  # None: granian not importable, main() says so
        lines.append(f"granian refused the encrypted private key, {key['error']}")
        lines.append("  so it was measured with a plaintext key: keybroker could not adopt it that way")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="client threads, one connection each (default 16)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four phases, median reported (default 2)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.cert, args.key)
        return 0
    if args.clients < 1 or args.rounds < 1 or args.duration <= 0:
        parser.error("--clients, --rounds and --duration must be positive")
    try:
        with tempfile.TemporaryDirectory(prefix="keybroker-bench-servers-") as tmp:
            document = bench(args, Path(tmp))
    except (SetupError, OSError, http.client.HTTPException) as exc:
        print(f"setup error: {exc}", file=sys.stderr)
        return 2
    print(report(document), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(document, indent=2))
    if "granian_missing" in document:
        print(f"granian is not importable: {document['granian_missing']}; only uvicorn measured", file=sys.stderr)
        return 2
    return 1 if any(row["errors"] for row in document["rounds_detail"]) else 0


if __name__ == "__main__":
    sys.exit(main())
