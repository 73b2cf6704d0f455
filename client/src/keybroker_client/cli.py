"""``keybroker-client fetch-key``: attest and receive a key (the workload side)."""

from __future__ import annotations

import argparse
import os
import sys

from keybroker_client._client import Client, ReleasedKey
from keybroker_client._errors import KeybrokerClientError, ProblemError
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keybroker-client", description="The keybroker workload client.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-key", help="attest and receive a key")
    fetch.add_argument("key_id")
    fetch.add_argument("--kbs", required=True, help="keybroker URL, e.g. https://kbs:9443")
    fetch.add_argument("--ca", help="the service CA certificate (PEM)")
    fetch.add_argument("--ca-fingerprint", help="or: the SHA-384 fingerprint of the service CA")
    fetch.add_argument("--evidence", required=True, help="sim:DIR[:sgx|tdx], tdx or sgx-gramine")
    fetch.add_argument("--passport", action="store_true", help="attest first, then present the token")
    fetch.add_argument(
        "--token",
        default=os.environ.get("KEYBROKER_TOKEN"),
        help="bearer token, if the key's policy names client permissions",
    )
    fetch.add_argument("--out", required=True, help="file to create with mode 0600, or - with --force")
    fetch.add_argument("--force", action="store_true", help="allow --out - (the key on stdout)")
    args = parser.parse_args(argv)
    try:
        with Client(args.kbs, ca=args.ca, ca_fingerprint=args.ca_fingerprint, token=args.token) as client:
            released = client.fetch_key(
                args.key_id, from_spec(args.evidence), mode="passport" if args.passport else "background"
            )
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
