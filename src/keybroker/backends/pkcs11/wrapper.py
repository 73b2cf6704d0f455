"""A ``KeyWrapper`` whose KEK is a non-extractable AES-256 key inside a PKCS#11 token (an HSM; SoftHSM2 in tests).

Contract:

* The KEK is the one secret-key object labelled ``key_label`` on the token labelled ``token_label``. It must be an
  AES-256 key that is sensitive and not extractable; anything else under that label (an extractable or
  non-sensitive key, a key of another type, two keys) is refused with ``ConfigurationError``. ``prepare()``
  (``keybroker init``) creates the KEK when the token has none, and never replaces one. Without a KEK the wrapper
  can be built, but ``wrap``/``unwrap``/``check`` raise ``ConfigurationError`` ("run keybroker init").
* ``wrap`` encrypts with CKM_AES_GCM inside the token, a fresh random 96-bit IV and the caller's context as AAD, and
  returns ``0x01 ‖ IV(12) ‖ ciphertext ‖ tag(16)``. The KEK never leaves the token.
* ``unwrap`` raises ``StoredKeyCorrupt`` for a blob naming another KEK, a malformed blob, or one that fails
  authentication (tampered, or another context); ``BackendUnavailable`` (naming the token label) when the token
  cannot be used now.
* ``kek_id`` is ``pkcs11:<token label>/<key label>``: public and stable.
* The PIN is kept in the object because reconnecting needs it; it is never in ``repr``, ``str`` or an exception.
  A PIN the token refused is not tried again by this object (retrying on every request would lock the token).

Sessions and failures:

* Up to ``sessions`` R/W sessions per wrapper, in a pool, opened without a PIN: the PKCS#11 login belongs to the
  process and the token, not to a session. One more session per token holds that login (closing it logs every
  session out); it is shared, reference-counted, by the wrappers of the process on that token, and a second wrapper
  whose PIN differs from the one logged in is refused.
* python-pkcs11 0.10 calls ``C_Initialize(NULL)``, which tells the module that the application will not call it
  from several threads at once; SoftHSM then turns its own locking off and crashes (heap corruption) under
  concurrent calls. Every call into a module is therefore serialised by one lock per module (per loaded library).
* When a call fails because the session, login, token or library is gone, the library is re-initialised (once for
  all wrappers of the process that share it), the token found again by label, and the operation retried once; if
  that fails too, ``BackendUnavailable``. Sessions from before a re-initialisation are never used again: handle
  numbers start again from 1, so an old handle could name another session or key.
* Nothing else in the process may finalise or re-initialise the same module behind this module's back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import queue
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pkcs11 import exceptions as p11
from pkcs11.constants import Attribute, ObjectClass
from pkcs11.mechanisms import KeyType, Mechanism

from keybroker.backends.pkcs11.library import (
    AUTH_FAILED,
    AUTH_FAILED_OR_BROKEN,
    KEK_TEMPLATE,
    PIN_REFUSED,
    PIN_SALT,
    TAG_BYTES,
    Login,
    StaleSession,
    gcm,
    is_lost,
    load_module,
)
from keybroker.config import Pkcs11WrapperSettings, SecretReader
from keybroker.errors import BackendUnavailable, ConfigurationError, KeybrokerError, StoredKeyCorrupt

_VERSION = b"\x01"
_IV_BYTES = 12
_KEK_BYTES = 32
_CHECKOUT_TIMEOUT_SECONDS = 30.0

_T = TypeVar("_T")


@dataclass(eq=False)
class _Conn:
    """A pooled session and the KEK as an object of that session (object handles are used through a session)."""

    session: Any
    epoch: int
    key: Any = None


class Pkcs11KeyWrapper:
    name = "pkcs11"

    def __init__(self, module: Path, token_label: str, key_label: str, pin: str, sessions: int = 4) -> None:
        if sessions < 1:
            raise ConfigurationError("the PKCS#11 session pool needs at least one session")
        self._module_path = str(module)
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin
        self._kek_id = f"pkcs11:{token_label}/{key_label}"
        self._sessions = sessions
        self._slots = threading.BoundedSemaphore(sessions)
        self._idle: queue.Queue[_Conn] = queue.Queue()
        # Guarded by the module lock:
        self._token: Any = None
        self._token_epoch = -1
        self._login: Login | None = None
        self._closed = False
        self._pin_refused = False
        self._starting = True
        self._module = load_module(module)
        try:
            # Find the token, log in, open a session and check the KEK if there is one: configuration mistakes
            # surface at start, not at the first request.
            self._run("connect", lambda conn: None)
        except BaseException:
            self.close()
            raise
        finally:
            self._starting = False

    @classmethod
    def from_settings(cls, secrets: SecretReader, cfg: Pkcs11WrapperSettings) -> Pkcs11KeyWrapper:
        pin = secrets.read(cfg.pin, "PKCS#11 PIN")
        return cls(secrets.resolve(cfg.module), cfg.token_label, cfg.key_label, pin, cfg.sessions)

    def __repr__(self) -> str:
        return (
            f"Pkcs11KeyWrapper(module={self._module_path!r}, token_label={self._token_label!r}, "
            f"key_label={self._key_label!r})"
        )

    @property
    def kek_id(self) -> str:
        return self._kek_id

    # -- KeyWrapper -----------------------------------------------------------------------------------------------

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        def encrypt(conn: _Conn) -> bytes:
            key = self._kek(conn)
            iv = os.urandom(_IV_BYTES)  # per attempt: a retry must not depend on whether the first one ran
            sealed = self._call(
                conn, lambda: key.encrypt(data_key, mechanism=Mechanism.AES_GCM, mechanism_param=gcm(iv, context))
            )
            return _VERSION + iv + bytes(sealed)

        return self._run("wrap", encrypt)

    def unwrap(self, wrapped: bytes, context: bytes, kek_id: str) -> bytes:
        if kek_id != self._kek_id:
            raise StoredKeyCorrupt(f"the data key was wrapped by KEK {kek_id}, not by the configured {self._kek_id}")
        if len(wrapped) < 1 + _IV_BYTES + TAG_BYTES or wrapped[:1] != _VERSION:
            raise StoredKeyCorrupt("a wrapped data key is malformed")
        iv, sealed = wrapped[1 : 1 + _IV_BYTES], wrapped[1 + _IV_BYTES :]

        def decrypt(conn: _Conn) -> bytes:
            key = self._kek(conn)
            try:
                plain = self._call(
                    conn, lambda: key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=gcm(iv, context))
                )
            except AUTH_FAILED:
                raise StoredKeyCorrupt("a wrapped data key failed authentication") from None
            except AUTH_FAILED_OR_BROKEN:
                self._probe(conn, key)  # raises if the token is at fault, not the blob
                raise StoredKeyCorrupt("a wrapped data key failed authentication") from None
            return bytes(plain)

        return self._run("unwrap", decrypt)

    def prepare(self) -> None:
        def create(conn: _Conn) -> None:
            if conn.key is not None:
                return

            def find_or_generate() -> None:
                # Under the module lock: another wrapper of this process may have created it since this session
                # searched. (Two processes running init at once could still both create one; the second search
                # below then refuses the pair as ambiguous rather than picking one.)
                conn.key = self._find_kek(conn.session)
                if conn.key is None:
                    conn.session.generate_key(
                        KeyType.AES, _KEK_BYTES * 8, label=self._key_label, store=True, template=KEK_TEMPLATE
                    )
                    conn.key = self._find_kek(conn.session)  # and check what the token made of the template

            self._call(conn, find_or_generate)

        self._run("prepare", create)
        self.check()  # the new (or existing) KEK round-trips before anything is wrapped with it

    def check(self) -> None:
        """The token answers, and a data key wrapped here opens again: an HSM that ignored the IV it was given
        (some generate GCM IVs themselves) would otherwise make every wrapped key unrecoverable, silently."""
        self._run("check", lambda conn: self._probe(conn, self._kek(conn)))
        probe = os.urandom(_KEK_BYTES)
        context = b"keybroker/pkcs11/self-test"
        if self.unwrap(self.wrap(probe, context), context, self.kek_id) != probe:
            raise ConfigurationError(f"the KEK in token {self._token_label!r} does not round-trip AES-GCM")

    def close(self) -> None:
        with self._module.lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    break
                self._discard(conn)
            self._release_login()
            self._token = None

    # -- running an operation ---------------------------------------------------------------------------------

    def _run(self, what: str, op: Callable[[_Conn], _T]) -> _T:
        """``op`` on a pooled session; reconnects and retries once when the session, token or library is gone."""
        failure: BaseException | None = None
        seen = self._module.epoch
        for attempt in range(2):
            if failure is not None:
                self._reconnect(seen)
            if not self._slots.acquire(timeout=_CHECKOUT_TIMEOUT_SECONDS):
                raise BackendUnavailable(
                    f"PKCS#11 token {self._token_label!r}: all {self._sessions} sessions stayed busy"
                )
            conn: _Conn | None = None
            try:
                with self._module.lock:
                    seen = self._module.epoch
                    conn = self._checkout()
                result = op(conn)
            except (p11.PKCS11Error, StaleSession) as exc:
                self._discard(conn)  # a session that failed is not trusted again
                if not is_lost(exc) or attempt == 1:
                    raise self._unavailable(what, exc) from exc
                failure = exc
            except BaseException:
                self._checkin(conn)
                raise
            else:
                self._checkin(conn)
                return result
            finally:
                self._slots.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, conn: _Conn, fn: Callable[[], _T]) -> _T:
        """One call (or a few that belong together) into the library, serialised with every other one."""
        with self._module.lock:
            if conn.epoch != self._module.epoch:
                raise StaleSession
            return fn()

    def _probe(self, conn: _Conn, key: Any) -> None:
        """Encrypt a block: raises the token's error if this session or the KEK cannot be used."""
        self._call(
            conn,
            lambda: key.encrypt(bytes(16), mechanism=Mechanism.AES_GCM, mechanism_param=gcm(os.urandom(12), b"")),
        )

    def _kek(self, conn: _Conn) -> Any:
        if conn.key is None:
            raise ConfigurationError(
                f"PKCS#11 token {self._token_label!r} has no KEK labelled {self._key_label!r}; "
                "run 'keybroker init' to create it"
            )
        return conn.key

    def _unavailable(self, what: str, exc: BaseException) -> KeybrokerError:
        if isinstance(exc, p11.NoSuchToken):
            if self._starting:
                return ConfigurationError(
                    f"PKCS#11 module {self._module_path} has no token labelled {self._token_label!r}"
                )
            return BackendUnavailable(f"PKCS#11 token {self._token_label!r} is not present")
        return BackendUnavailable(f"PKCS#11 token {self._token_label!r} is unavailable ({what}: {type(exc).__name__})")

    # -- the pool (every method below runs with the module lock held, or takes it) --------------------------------

    def _checkout(self) -> _Conn:
        module = self._module
        if self._closed:
            raise BackendUnavailable(f"PKCS#11 token {self._token_label!r}: the wrapper is closed")
        if self._token is None or self._token_epoch != module.epoch:
            self._connect()
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if conn.epoch == module.epoch:
                return conn
            # From before a re-initialisation: dropped without C_CloseSession, its handle may name a new session.
        conn = _Conn(self._token.open(rw=True), module.epoch)  # no PIN: the token is logged in (``_log_in``)
        try:
            # Only on a session opened just now: a search that fails leaves python-pkcs11 0.10 with a
            # half-finished search object whose finaliser calls C_FindObjectsFinal later, outside this lock.
            conn.key = self._find_kek(conn.session)
        except BaseException:
            self._discard(conn)
            raise
        return conn

    def _checkin(self, conn: _Conn | None) -> None:
        if conn is None:
            return
        with self._module.lock:
            # Sessions without a KEK are not kept: the next one searches again on a new session (see _checkout).
            if self._closed or conn.key is None or conn.epoch != self._module.epoch:
                self._discard(conn)
            else:
                self._idle.put(conn)

    def _discard(self, conn: _Conn | None) -> None:
        if conn is None:
            return
        with self._module.lock:
            if conn.epoch == self._module.epoch:
                with suppress(p11.PKCS11Error):
                    conn.session.close()  # opened without a PIN: closing it does not log the token out

    def _connect(self) -> None:
        """Find the token by label and join (or make) the process's login on it."""
        if self._pin_refused:
            raise BackendUnavailable(
                f"PKCS#11 token {self._token_label!r} refused the PIN earlier; fix the PIN and restart keybroker"
            )
        self._release_login()
        self._token = None
        try:
            token = self._module.lib.get_token(token_label=self._token_label)
        except p11.MultipleTokensReturned:
            raise ConfigurationError(
                f"PKCS#11 module {self._module_path} has several tokens labelled {self._token_label!r}"
            ) from None
        self._login = self._log_in(token)
        self._token, self._token_epoch = token, self._module.epoch

    def _log_in(self, token: Any) -> Login:
        module = self._module
        digest = hashlib.sha256(PIN_SALT + self._pin.encode()).digest()
        current = module.logins.get(self._token_label)
        if current is not None and current.epoch == module.epoch:
            if not hmac.compare_digest(current.pin_digest, digest):
                raise self._pin_error("it differs from the PIN this process is logged in with")
            current.users += 1
            return current
        try:
            session = token.open(rw=True, user_pin=self._pin)
        except p11.UserAlreadyLoggedIn:
            # Logged in by code of this process that does not go through this registry; nothing of ours to log out.
            session = None
        except PIN_REFUSED as exc:
            self._pin_refused = True
            raise self._pin_error(type(exc).__name__) from None
        login = module.logins[self._token_label] = Login(session, module.epoch, digest)
        return login

    def _pin_error(self, reason: str) -> KeybrokerError:
        detail = f"PKCS#11 token {self._token_label!r} refused the PIN ({reason})"
        return ConfigurationError(detail) if self._starting else BackendUnavailable(detail)

    def _release_login(self) -> None:
        login, self._login = self._login, None
        if login is None:
            return
        login.users -= 1
        module = self._module
        if login.users == 0 and module.logins.get(self._token_label) is login:
            del module.logins[self._token_label]
            if login.session is not None and login.epoch == module.epoch:
                with suppress(p11.PKCS11Error):
                    login.session.close()  # C_Logout, then C_CloseSession

    def _reconnect(self, seen: int) -> None:
        """Re-initialise the library, unless another thread already did since ``seen``."""
        module = self._module
        with module.lock:
            if self._closed:  # a call that was in flight at close(): do not disturb the others
                raise BackendUnavailable(f"PKCS#11 token {self._token_label!r}: the wrapper is closed")
            if module.epoch != seen:
                return
            module.epoch += 1  # whatever happens next, every handle from before is meaningless
            module.logins.clear()
            # Not lib.reinitialize(): when C_Finalize fails (the library is already down) it gives up before
            # C_Initialize.
            with suppress(p11.PKCS11Error):
                module.lib.finalize()
            try:
                module.lib.initialize()
            except p11.PKCS11Error as exc:
                raise self._unavailable("re-initialising the library", exc) from exc

    def _find_kek(self, session: Any) -> Any:
        """The KEK as an object of ``session``, None if the token has none; refuses one that is not fit."""
        found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self._key_label}))
        if not found:
            return None
        where = f"PKCS#11 token {self._token_label!r}"
        if len(found) > 1:
            raise ConfigurationError(
                f"{where} holds {len(found)} secret keys labelled {self._key_label!r}; "
                "the KEK is ambiguous: remove or relabel all but one"
            )
        key = found[0]

        def attribute(which: Attribute) -> Any:
            try:
                return key[which]
            except (p11.AttributeTypeInvalid, p11.AttributeSensitive):  # e.g. no CKA_VALUE_LEN on a DES3 key
                return None

        problems: list[str] = []
        if attribute(Attribute.KEY_TYPE) != KeyType.AES or attribute(Attribute.VALUE_LEN) != _KEK_BYTES:
            problems.append("it is not an AES-256 key")
        if attribute(Attribute.SENSITIVE) is not True:
            problems.append("it is not sensitive (CKA_SENSITIVE)")
        if attribute(Attribute.EXTRACTABLE) is not False:
            problems.append("it is extractable (CKA_EXTRACTABLE)")
        if attribute(Attribute.ENCRYPT) is not True or attribute(Attribute.DECRYPT) is not True:
            problems.append("it may not encrypt and decrypt")
        if problems:
            raise ConfigurationError(f"refusing the KEK {self._key_label!r} on {where}: {'; '.join(problems)}")
        return key
