"""``keybroker-client provision``: the workload agent of Intel's SKC / Nginx flow.

Reads the guide's ``keys.txt`` (one RFC 7512 PKCS#11 URI per line)::

    pkcs11:token=KMS;id=<key id>;object=RSAKEY;type=private;pin-value=1234;

attests and fetches **every** key first, and only when all were released imports them into the token(s): RSA and
EC keys as a sensitive, non-extractable ``CKO_PRIVATE_KEY`` plus the matching ``CKO_PUBLIC_KEY`` (same ``CKA_LABEL``
and ``CKA_ID``), AES keys as a sensitive, non-extractable ``CKO_SECRET_KEY``. ``CKA_ID`` is the key id's bytes (the
UUID string, ASCII) and ``CKA_LABEL`` the URI's ``object``. Re-running replaces the objects with that label and id:
the new objects are created first, then the old handles destroyed. Key bytes stay in this process's memory (and then
in the token); nothing is written to disk by this module, and nothing printed but ids, labels and algorithms.

Needs the ``pkcs11`` extra (python-pkcs11). python-pkcs11 0.10 has no ``C_InitToken``; ``--init-token`` calls it
through the module's own ``CK_FUNCTION_LIST`` with ctypes (the library python-pkcs11 already initialised).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from keybroker_client._client import ReleasedKey
from keybroker_client._errors import KeybrokerClientError, ProblemError
from keybroker_client.provision.keys_txt import KeyEntry, KeysFileError, parse_keys_file
from keybroker_client.provision.token import (
    Material,
    ProvisionError,
    describe,
    find_token,
    free_slot,
    initialise_token,
    load_pkcs11,
    material_for,
    replace_objects,
    session_of,
)

OK, FAILED, USAGE = 0, 1, 2


def provision(
    entries: Sequence[KeyEntry],
    module: str,
    fetch: Callable[[str], ReleasedKey],
    out: TextIO,
    err: TextIO,
    so_pin: str | None = None,
) -> int:
    """Check the tokens, fetch every key, then import them all. ``so_pin`` set = initialise missing tokens.
    Returns the exit code; messages go to ``out``/``err``."""
    pkcs11 = None
    try:
        pkcs11 = load_pkcs11()
        # python-pkcs11 caches libraries by path string: one module under two names (SoftHSM installs a symlink)
        # would be C_Initialize'd twice in a process that also loads it elsewhere.
        module = os.path.realpath(module)
        try:
            lib = pkcs11.lib(module)
        except (pkcs11.exceptions.PKCS11Error, OSError, RuntimeError) as exc:
            raise ProvisionError(f"cannot load the PKCS#11 module {module}: {describe(exc)}") from None
        missing = _preflight(lib, module, entries, so_pin)
        materials = _fetch_all(entries, fetch, err)
        if materials is None:
            return FAILED
        for label in missing:
            slot_id = initialise_token(lib, module, label, so_pin or "", _pins(entries)[label])
            print(f"initialised token {label} (slot {slot_id})", file=out)
        return _import_all(lib, entries, materials, out, err)
    except ProvisionError as exc:
        print(f"error: {exc}", file=err)
        return FAILED
    except Exception as exc:
        if pkcs11 is not None and isinstance(exc, pkcs11.exceptions.PKCS11Error):
            print(f"error: {module}: {describe(exc)}", file=err)
            return FAILED
        raise


def _pins(entries: Sequence[KeyEntry]) -> dict[str, str]:
    return {e.token: e.pin for e in entries}


def _preflight(lib: Any, module: str, entries: Sequence[KeyEntry], so_pin: str | None) -> list[str]:
    """Before any network call: every token exists (or can be initialised) and its PIN works. Returns the labels
    of the tokens to initialise."""
    missing: list[str] = []
    for label, pin in _pins(entries).items():
        token = find_token(lib, label)
        if token is not None:
            with session_of(token, pin):
                pass
        elif so_pin is None:
            raise ProvisionError(
                f"no token labelled {label} in {module}; create it (e.g. softhsm2-util --init-token --free "
                f"--label {label}) or pass --init-token --so-pin-file FILE"
            )
        else:
            missing.append(label)
    if missing and free_slot(lib) is None:
        raise ProvisionError(f"no free slot to initialise token(s) {', '.join(missing)} in")
    return missing


def _fetch_all(entries: Sequence[KeyEntry], fetch: Callable[[str], ReleasedKey], err: TextIO) -> list[Material] | None:
    """Attest and fetch every key, and check each is what keys.txt says; one refusal = None (nothing imported)."""
    released: dict[str, ReleasedKey] = {}
    for entry in entries:
        if entry.key_id in released:
            continue
        try:
            released[entry.key_id] = fetch(entry.key_id)
        except ProblemError as exc:
            print(f"refused: key {entry.key_id} (line {entry.line}): {exc.problem.describe()}", file=err)
        except (KeybrokerClientError, ValueError, OSError) as exc:
            print(f"error: key {entry.key_id} (line {entry.line}): {exc}", file=err)
        else:
            continue
        print(f"nothing was imported ({len(released)} of {len(entries)} key(s) had been fetched)", file=err)
        return None
    try:
        return [material_for(entry, released[entry.key_id].key) for entry in entries]
    finally:
        released.clear()


def _import_all(lib: Any, entries: Sequence[KeyEntry], materials: Sequence[Material], out: TextIO, err: TextIO) -> int:
    from pkcs11.exceptions import PKCS11Error

    failed = False
    for label, pin in _pins(entries).items():
        token = find_token(lib, label)
        if token is None:
            raise ProvisionError(f"token {label} disappeared")
        with session_of(token, pin) as session:
            for entry, material in zip(entries, materials, strict=True):
                if entry.token != label:
                    continue
                try:
                    replaced, others = replace_objects(session, entry, material)
                except PKCS11Error as exc:
                    print(
                        f"error: key {entry.key_id} (line {entry.line}): import into token {label} "
                        f"failed: {describe(exc)}",
                        file=err,
                    )
                    failed = True
                    continue
                kinds = "private key + public key" if len(material.templates) == 2 else "secret key"
                note = f"; replaced {replaced} old object(s)" if replaced else ""
                print(
                    f"imported {entry.key_id}: token {label}, object {entry.label}, {material.algorithm} "
                    f"({kinds}{note})",
                    file=out,
                )
                if others:
                    print(
                        f"warning: token {label} also holds {others} object(s) labelled {entry.label} with "
                        "another id; tools that select by label alone (nginx's URI) may pick either",
                        file=err,
                    )
    return FAILED if failed else OK


__all__ = [
    "FAILED",
    "OK",
    "USAGE",
    "KeyEntry",
    "KeysFileError",
    "ProvisionError",
    "parse_keys_file",
    "provision",
]
