"""``keybroker-client fetch-key``: attest and receive a key (the workload side).

``keybroker-client provision``: attest, receive every key of a ``keys.txt`` and import them into PKCS#11 token(s)
(Intel's SKC / Nginx flow; see ``keybroker_client.provision``). Exit codes: 0 ok, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Literal

from keybroker_client._client import Client, ReleasedKey
from keybroker_client._errors import ConfigurationError, KeybrokerClientError, ProblemError
from keybroker_client._retry import Retry
from keybroker_client.evidence import from_spec


def _write(released: ReleasedKey, out: str, force: bool) -> None:
    if out == "-":
        if not force:
            raise SystemExit("refusing to print a key to stdout without --force")
        sys.stdout.buffer.write(released.key)
        return
    # A new file (O_EXCL, never a symlink's target) with mode 0600 from the start, renamed into place: the key is
    # never in a file that others can read, not even briefly, and an existing file is replaced whole.
    target = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(released.key)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.kbs, ca=args.ca, ca_fingerprint=args.ca_fingerprint, token=args.token, retry=Retry(args.attempts)
    )


def _connection_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--kbs",
        required=True,
        metavar="URL",
        help="keybroker URL, e.g. https://kbs:9443; several replicas comma-separated (tried in turn on failure)",
    )
    command.add_argument(
        "--attempts",
        type=int,
        default=4,
        metavar="N",
        help="exchanges per key at most, each with a fresh nonce, when a replica fails (default 4; 1: no retry)",
    )
    command.add_argument("--ca", metavar="FILE", help="the service CA certificate (PEM)")
    command.add_argument(
        "--ca-fingerprint",
        metavar="HASH",
        help="or: the SHA-384 fingerprint of the service CA (several, comma-separated, during a CA rotation)",
    )
    command.add_argument(
        "--evidence",
        default="auto",
        metavar="SOURCE",
        help="auto (the default: tdx if configfs-tsm is there, else sgx-gramine if /dev/attestation is), tdx, "
        "sgx-gramine or sim:DIR[:sgx|tdx][:FIELD=VALUE,...] (e.g. mrenclave=HEX,isvsvn=2)",
    )
    command.add_argument("--passport", action="store_true", help="attest first, then present the token")
    command.add_argument(
        "--token",
        default=os.environ.get("KEYBROKER_TOKEN"),  # (never shown in the help)
        metavar="TOKEN",
        help="bearer token, if the key's policy names client permissions (default: $KEYBROKER_TOKEN)",
    )


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.read().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not value:
        raise ValueError(f"the {what} file {path} is empty")
    return value


def _provision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from keybroker_client.provision import USAGE, KeysFileError, parse_keys_file, provision

    if args.init_token != bool(args.so_pin_file):
        parser.error("--init-token and --so-pin-file go together")
    try:
        with open(args.keys, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.keys}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return USAGE
    try:
        entries = parse_keys_file(text, args.keys)
        so_pin = _read_secret_file(args.so_pin_file, "SO PIN") if args.so_pin_file else None
        for option, path in (("--pkcs11-module", args.pkcs11_module), ("--ca", args.ca)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{option} {path}: no such file")
        evidence = from_spec(args.evidence)
    except KeysFileError as exc:
        print(str(exc), file=sys.stderr)
        print("nothing was fetched", file=sys.stderr)
        return USAGE
    except (ValueError, OSError, KeybrokerClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    mode: Literal["background", "passport"] = "passport" if args.passport else "background"
    try:
        client = _client(args)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except (KeybrokerClientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with client:
        return provision(
            entries,
            args.pkcs11_module,
            lambda key_id: client.fetch_key(key_id, evidence, mode=mode),
            out=sys.stdout,
            err=sys.stderr,
            so_pin=so_pin,
        )


class _Help(argparse.HelpFormatter):
    """Paragraphs wrapped to the terminal's width as usual; indented lines (the examples) kept whole, to copy."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n".join(
            indent + line if line.startswith(" ") else fill(line, width, indent) for line in text.splitlines()
        )


FETCH_EXAMPLE = "keybroker-client fetch-key KEY_ID --kbs https://kbs:9443 --ca ca.pem --out key.bin"
PROVISION_EXAMPLE = (
    "keybroker-client provision --keys keys.txt --pkcs11-module libsofthsm2.so --kbs https://kbs:9443 --ca ca.pem"
)


def build_parser() -> argparse.ArgumentParser:
    """The command line: each command's help ends with an example (tests/unit/test_cli_help.py parses them)."""
    parser = argparse.ArgumentParser(
        prog="keybroker-client",
        description="The keybroker workload client.",
        epilog=f"Examples:\n  {FETCH_EXAMPLE}\n  {PROVISION_EXAMPLE}",
        formatter_class=_Help,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch-key",
        help="attest and receive a key",
        description="Attest and receive one key into a new file (mode 0600).",
        epilog=f"Example:\n  {FETCH_EXAMPLE}",
        formatter_class=_Help,
    )
    fetch.add_argument("key_id", metavar="KEY_ID", help="the key to receive")
    _connection_options(fetch)
    fetch.add_argument("--out", required=True, metavar="FILE", help="file to create with mode 0600, or - with --force")
    fetch.add_argument("--force", action="store_true", help="allow --out - (the key on stdout)")
    prov = commands.add_parser(
        "provision",
        help="attest, receive the keys of a keys.txt and import them into PKCS#11 token(s)",
        description="Fetch every key listed in the --keys file (one pkcs11: URI per line, e.g. "
        "pkcs11:token=KMS;id=<key id>;object=RSAKEY;type=private;pin-value=1234) by attestation, then import "
        "them all as sensitive, non-extractable objects. Nothing is imported unless every key was released.",
        epilog=f"Example:\n  {PROVISION_EXAMPLE}",
        formatter_class=_Help,
    )
    prov.add_argument("--keys", required=True, metavar="FILE", help="the keys file (one RFC 7512 URI per line)")
    prov.add_argument(
        "--pkcs11-module", required=True, metavar="LIBRARY", help="the PKCS#11 module, e.g. libsofthsm2.so"
    )
    _connection_options(prov)
    prov.add_argument("--init-token", action="store_true", help="initialise tokens that do not exist yet")
    prov.add_argument("--so-pin-file", metavar="FILE", help="the SO PIN for --init-token (a file, one line)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "provision":
        return _provision(parser, args)
    return _fetch_key(args)


def _fetch_key(args: argparse.Namespace) -> int:
    try:
        evidence = from_spec(args.evidence)
    except (ValueError, OSError, KeybrokerClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        client = _client(args)
    except ConfigurationError as exc:  # a wrong --kbs, --ca, --ca-fingerprint, --token or --attempts
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeybrokerClientError, OSError) as exc:  # the pinned CA could not be fetched or does not match
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        with client:
            released = client.fetch_key(args.key_id, evidence, mode="passport" if args.passport else "background")
        _write(released, args.out, args.force)
    except ProblemError as exc:
        print(f"refused: {exc.problem.describe()}", file=sys.stderr)
        return 1
    except (KeybrokerClientError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"received key {args.key_id} ({len(released.key)} bytes) -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
