"""python-pkcs11, as the wrapper uses it: which of its exceptions mean what (the one table from vendor errors to
keybroker's handling), the KEK's template, and the registry of loaded modules and logins shared by every wrapper of
the process (see the wrapper's contract for why calls are serialised per module)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute
from pkcs11.mechanisms import GCMParams

from keybroker.errors import ConfigurationError

TAG_BYTES = 16

# Errors meaning that the session, the login, the token or the library is gone: drop the pool, re-initialise the
# library and try once more. NoSuchToken is here because a token that came back (or was created after the library
# was loaded) is only seen after C_Initialize again. CKR_CRYPTOKI_NOT_INITIALIZED has no class of its own in
# python-pkcs11 0.10 (a bare PKCS11Error, like unmapped codes): see ``is_lost``.
LOST: tuple[type[Exception], ...] = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.DeviceMemory,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.SlotIDInvalid,
    p11.GeneralError,
    p11.UserNotLoggedIn,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.NoSuchToken,
)

# A GCM tag mismatch. The specification's answer is CKR_ENCRYPTED_DATA_INVALID (or _LEN_RANGE); SoftHSM 2.6.1 answers
# CKR_GENERAL_ERROR, which is also what a broken token says, so those two are told apart by a probe (``_probe``).
AUTH_FAILED: tuple[type[Exception], ...] = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange)
AUTH_FAILED_OR_BROKEN: tuple[type[Exception], ...] = (p11.GeneralError, p11.FunctionFailed)

PIN_REFUSED: tuple[type[Exception], ...] = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinExpired,
    p11.PinLocked,
    p11.UserPinNotInitialized,
)

KEK_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}

# Logins are compared by salted digest, so that the shared registry does not hold yet another copy of a PIN.
PIN_SALT = os.urandom(16)


class StaleSession(Exception):
    """A pooled session from before the library was re-initialised."""


def is_lost(exc: BaseException) -> bool:
    return isinstance(exc, (StaleSession, *LOST)) or type(exc) is p11.PKCS11Error


def gcm(iv: bytes, aad: bytes) -> Any:
    return GCMParams(iv, aad, TAG_BYTES * 8)  # an object, not a tuple, in python-pkcs11 0.10


@dataclass(eq=False)
class Login:
    """This process's login on one token (PKCS#11 logs an application in, not a session)."""

    session: Any  # the session C_Login ran on (closing it logs the token out); None if someone else logged in
    epoch: int
    pin_digest: bytes
    users: int = 1


class Module:
    """One loaded PKCS#11 library, shared by every wrapper of the process naming the same file."""

    def __init__(self, path: str, lib: Any) -> None:
        self.path = path
        self.lib = lib
        self.lock = threading.RLock()  # held around every call into the library (module docstring)
        self.epoch = 0  # +1 at each re-initialisation: older sessions, keys and logins are dead
        self.logins: dict[str, Login] = {}  # by token label


_modules: dict[str, Module] = {}
_modules_lock = threading.Lock()


def load_module(path: Path) -> Module:
    if not path.is_file():
        raise ConfigurationError(f"PKCS#11 module {path} does not exist")
    # python-pkcs11 caches libraries by path string; the same file under two names (SoftHSM installs a symlink)
    # would be loaded twice and C_Initialize'd twice.
    real = os.path.realpath(path)
    with _modules_lock:
        module = _modules.get(real)
        if module is None:
            try:
                lib = pkcs11.lib(real)
            except p11.PKCS11Error as exc:
                raise ConfigurationError(f"cannot load the PKCS#11 module {path}: {exc}") from None
            module = _modules[real] = Module(real, lib)
        return module
