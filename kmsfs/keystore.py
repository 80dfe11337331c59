"""The key store: customer master keys inside a PKCS#11 HSM.

Every CMK version is one AES-256 secret key object on the token, generated
inside the HSM as sensitive and non-extractable.  kmsfs only ever asks the HSM
to encrypt or decrypt a 32-byte data key with CKM_AES_GCM (named explicitly),
with a random 96-bit nonce from os.urandom and associated data supplied by
the caller.  Key material never leaves the HSM.

A PKCS#11 session must not be used by two threads at once, so every call goes
through one lock.  Callers on the trio loop run these methods in a worker
thread.

Changes of a key object's attributes (enable, disable) are the exception:
they never run in this process but in a detached helper (hsmchange.py),
because a module may store them non-atomically (SoftHSM2 truncates and
rewrites the object's file) and a kill of this process must not be able to
interrupt one.  Creating and destroying objects stay here: an interrupted
creation leaves at most an unused object, never damages an existing one.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import uuid
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11exc
from pkcs11.mechanisms import GCMParams

from .format import DEK_SIZE, NONCE_SIZE, TAG_SIZE
from .hsmchange import RegistryWrite, UsableChange, run_helper
from .pkcs11uri import Pkcs11Uri, UriError

log = logging.getLogger(__name__)

GCM_TAG_BITS = 128
# python-pkcs11 has no exception class for this return value; it reports the code.
CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68
_VERSION = struct.Struct(">I")


class HsmError(Exception):
    """A failure at the HSM boundary.  ``errno`` is what a FUSE caller gets."""

    errno = errno.EIO


class HsmModuleError(HsmError):
    """The PKCS#11 module can't be found or loaded."""


class HsmTokenNotFound(HsmError):
    """No token with the configured label."""


class HsmPinIncorrect(HsmError):
    errno = errno.EACCES


class HsmKeyMissing(HsmError):
    """The CMK version is not on the token (never created, or destroyed)."""

    errno = errno.EIO


class HsmKeyRefused(HsmError):
    """The HSM refuses to use the key for this function (e.g. disabled)."""

    errno = errno.EACCES


class HsmUnwrapFailed(HsmError):
    """The wrapped data or its associated data was altered, or the wrong key was used."""

    errno = errno.EIO


class HsmUnavailable(HsmError):
    """The token stopped answering (removed, its storage gone, the module failed).

    Only the request that needed the HSM fails; the next call tries again to
    reach the token (new session, login, and if need be a fresh C_Initialize).
    """

    errno = errno.EIO


#: python-pkcs11 errors that say the session or the token is gone, not the key.
_CONNECTION_ERRORS = (
    p11exc.SessionHandleInvalid, p11exc.SessionClosed, p11exc.UserNotLoggedIn, p11exc.DeviceError,
    p11exc.DeviceRemoved, p11exc.TokenNotPresent, p11exc.TokenNotRecognised, p11exc.SlotIDInvalid,
    p11exc.DeviceMemory,
)


_loaded_libs: dict[str, Any] = {}
_libs_lock = threading.Lock()


def _load_module(path: str) -> Any:
    with _libs_lock:
        lib = _loaded_libs.get(path)
        if lib is None:
            if not os.path.exists(path):
                raise HsmModuleError(f"PKCS#11 module {path} does not exist")
            try:
                lib = pkcs11.lib(path)
            except (RuntimeError, OSError, p11exc.PKCS11Error) as exc:
                raise HsmModuleError(f"cannot load PKCS#11 module {path}: {_describe(exc)}{_softhsm2_hint()}") from exc
            _loaded_libs[path] = lib
        return lib


def _softhsm2_hint() -> str:
    """Why SoftHSM2 may refuse to initialise: its token directory is gone (C_Initialize fails)."""
    conf = os.environ.get("SOFTHSM2_CONF")
    if not conf:
        return ""
    try:
        with open(conf, encoding="utf-8") as fh:
            for line in fh:
                name, _, value = line.partition("=")
                if name.strip() == "directories.tokendir":
                    tokendir = value.strip()
                    if tokendir and not os.path.isdir(tokendir):
                        return (f" (the SoftHSM2 token directory {tokendir} named in {conf} is missing: "
                                f"the tokens, and this store's keys, live there)")
    except OSError:
        pass
    return ""


#: Environment a store's config may set for its module: configuration, never code.
ALLOWED_ENV = ("SOFTHSM2_CONF",)


def check_module_path(path: str) -> None:
    """Refuse a PKCS#11 module that anyone but root or us could have replaced.

    The module path comes from the store's config.json, which lives in the
    backing directory; a module is code loaded into the daemon, so it must be
    an absolute path to a file that only root (or the daemon's user) can write.
    """
    if not os.path.isabs(path):
        raise HsmModuleError(f"the PKCS#11 module path {path!r} must be absolute")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HsmModuleError(f"PKCS#11 module {path} does not exist") from None
    except OSError as exc:
        raise HsmModuleError(f"cannot use PKCS#11 module {path}: {os.strerror(exc.errno or 0)}") from None
    trusted = {0, os.geteuid()}
    if st.st_uid not in trusted or st.st_mode & 0o022:
        raise HsmModuleError(
            f"refusing PKCS#11 module {path}: it must be owned by root (or you) and not "
            f"writable by group or others"
        )


def object_id(key_id: uuid.UUID, version: int) -> bytes:
    """CKA_ID of one CMK version: the 16 key id bytes and the version, big-endian."""
    return key_id.bytes + _VERSION.pack(version)


def _import_object_id(key_id: uuid.UUID) -> bytes:
    return key_id.bytes + b"IMPT"


def object_label(key_id: uuid.UUID, version: int) -> str:
    return f"kmsfs:{key_id}:v{version}"


class KeyStore:
    """A logged-in session on one PKCS#11 token."""

    def __init__(self, uri: Pkcs11Uri, env: dict[str, str] | None = None) -> None:
        self.uri = uri
        #: Given again to the attribute-change helper, which opens its own session.
        self._env = dict(env or {})
        # Modules such as SoftHSM2 read their configuration from the environment
        # when they are first initialised, so it must be set before loading.
        for name, value in (env or {}).items():
            if name not in ALLOWED_ENV:
                raise HsmModuleError(f"refusing to set {name} for the PKCS#11 module (allowed: {', '.join(ALLOWED_ENV)})")
            if name == "SOFTHSM2_CONF" and not os.path.exists(value):
                raise HsmModuleError(
                    f"the SoftHSM2 configuration {value} is missing: was the embedded HSM's state "
                    f"directory moved or deleted? It holds the token with this store's keys."
                )
            os.environ[name] = value
        check_module_path(uri.module_path)
        self._lib = _load_module(uri.module_path)
        self._token, self._session = self._open_session()
        self._lock = threading.Lock()
        #: Encrypt and decrypt calls made in the HSM (kept under the lock), for
        #: the status file: the documented HSM cost of each operation is tested on it.
        self.calls = {"encrypt": 0, "decrypt": 0}
        self._handles: dict[bytes, Any] = {}
        #: Set when the token stopped answering; the next call reconnects first.
        self._broken = False
        log.info("logged in to PKCS#11 token %r (module %s)", uri.token, uri.module_path)

    def _open_session(self) -> tuple[Any, Any]:
        """Find the token and log in: a new read-write user session."""
        uri = self.uri
        try:
            token = self._lib.get_token(token_label=uri.token)
        except p11exc.NoSuchToken as exc:
            raise HsmTokenNotFound(
                f"no PKCS#11 token labelled {uri.token!r} in module {uri.module_path}"
            ) from exc
        except p11exc.PKCS11Error as exc:
            raise HsmError(f"cannot list tokens of {uri.module_path}: {_describe(exc)}") from exc
        try:
            pin = uri.read_pin()
        except UriError as exc:
            raise HsmPinIncorrect(str(exc)) from exc
        try:
            session = token.open(user_pin=pin, rw=True)
        except (p11exc.PinIncorrect, p11exc.PinLenRange, p11exc.PinInvalid) as exc:
            raise HsmPinIncorrect(f"the PIN for token {uri.token!r} is wrong") from exc
        except p11exc.PinLocked as exc:
            raise HsmPinIncorrect(f"the PIN of token {uri.token!r} is locked") from exc
        except p11exc.PKCS11Error as exc:
            raise HsmError(f"cannot log in to token {uri.token!r}: {_describe(exc)}") from exc
        return token, session

    # ------------------------------------------------------------------ faults and recovery

    def _call(self, fn: Any) -> Any:
        """Run ``fn`` (with the lock held) on a live session.

        A failure is checked against the token itself: if the token no longer
        answers, cached handles and the session are dropped, the session is
        opened again and ``fn`` is retried once; if the token is still gone,
        the caller gets HsmUnavailable (EIO) and the next call tries again.
        Failures of a healthy token (missing key, disabled key, bad data)
        pass through unchanged.
        """
        if self._broken:
            self._reconnect()
        try:
            return fn()
        except (HsmError, p11exc.PKCS11Error) as exc:
            if isinstance(exc, HsmPinIncorrect) or not (
                isinstance(exc, HsmUnavailable) or _is_connection_error(exc) or self._token_lost()
            ):
                if isinstance(exc, p11exc.PKCS11Error):
                    raise HsmError(f"HSM call failed: {_describe(exc)}") from exc
                raise
            if not self._broken:
                log.error("the PKCS#11 token %r stopped answering (%s); reconnecting",
                          self.uri.token, _describe(exc))
            self._broken = True
            self._handles.clear()
        self._reconnect()
        return fn()

    def _token_lost(self) -> bool:
        """Whether the token behind our session no longer answers (one C_GetTokenInfo)."""
        try:
            info = self._token.slot.get_token()
        except p11exc.PKCS11Error:
            return True
        return info.label != self.uri.token

    def _reconnect(self) -> None:
        """A new session and login; a fresh C_Initialize of the module if that is not enough.

        SoftHSM2, for one, keeps a token whose storage vanished marked invalid
        until the module is initialised again.  Raises HsmUnavailable while the
        token still does not answer.
        """
        self._broken = True
        self._handles.clear()
        try:
            self._session.close()
        except Exception as exc:  # the session may be long dead; nothing to keep of it
            log.debug("closing the old PKCS#11 session failed: %s", _describe(exc))
        try:
            self._token, self._session = self._open_session()
        except HsmPinIncorrect:
            raise
        except HsmError:
            with _libs_lock:
                try:
                    self._lib.reinitialize()
                except p11exc.PKCS11Error as exc:
                    raise HsmUnavailable(
                        f"the HSM is unavailable: module {self.uri.module_path} could not be "
                        f"initialised again ({_describe(exc)})"
                    ) from exc
            try:
                self._token, self._session = self._open_session()
            except HsmPinIncorrect:
                raise
            except HsmError as exc:
                raise HsmUnavailable(f"the HSM is unavailable: {exc}") from exc
        self._broken = False
        log.warning("reconnected to PKCS#11 token %r", self.uri.token)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._handles.clear()
            try:
                self._session.close()
            except p11exc.PKCS11Error:
                if not self._broken:
                    log.warning("closing the PKCS#11 session failed", exc_info=True)

    def generate_key(self, key_id: uuid.UUID, version: int, usable: bool = True) -> None:
        """Create CMK version ``version`` inside the HSM, non-extractable.

        ``usable=False`` creates it with CKA_ENCRYPT/CKA_DECRYPT off (a rotation
        of a disabled key): set at creation, with no attribute change later.
        """
        oid = object_id(key_id, version)
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: usable,
            Attribute.DECRYPT: usable,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.MODIFIABLE: True,
        }
        def op() -> None:
            try:
                key = self._session.generate_key(
                    KeyType.AES, 256, id=oid, label=object_label(key_id, version),
                    store=True, template=template,
                    mechanism=Mechanism.AES_KEY_GEN,
                )
            except p11exc.PKCS11Error as exc:
                raise HsmError(f"the HSM could not generate a key: {_describe(exc)}") from exc
            self._handles[oid] = key

        with self._lock:
            self._call(op)
        log.info("generated CMK %s version %d in the HSM", key_id, version)

    def has_key(self, key_id: uuid.UUID, version: int) -> bool:
        def op() -> bool:
            try:
                self._key(key_id, version)
            except HsmKeyMissing:
                if self._token_lost():  # a lost token finds no key at all
                    raise HsmUnavailable(
                        f"the HSM is unavailable: token {self.uri.token!r} does not answer") from None
                return False
            return True

        with self._lock:
            return self._call(op)

    def is_usable(self, key_id: uuid.UUID, version: int) -> bool:
        """Whether the HSM lets the key encrypt or decrypt (its CKA_ENCRYPT/CKA_DECRYPT)."""
        def op() -> bool:
            key = self._key(key_id, version, fresh=True)
            try:
                return bool(key[Attribute.ENCRYPT]) or bool(key[Attribute.DECRYPT])
            except p11exc.PKCS11Error as exc:
                raise HsmError(f"cannot read the attributes of CMK {key_id} v{version}: {_describe(exc)}") from exc

        with self._lock:
            return self._call(op)

    def set_usable(self, key_id: uuid.UUID, version: int, usable: bool) -> None:
        """Turn the key's CKA_ENCRYPT and CKA_DECRYPT on or off inside the HSM (in the helper)."""
        if self.set_usable_many([UsableChange(key_id, version, usable)]):
            raise HsmKeyMissing(f"CMK {key_id} version {version} is not in the HSM")

    def set_usable_many(self, changes: list[UsableChange],
                        registry: RegistryWrite | None = None) -> list[UsableChange]:
        """Make the attribute ``changes``, then write ``registry``, in a detached helper process.

        The helper (hsmchange.py) finishes even if this process is killed
        meanwhile.  Returns the changes whose key version is not on the token
        (skipped).  Raises HsmError (HsmPinIncorrect, HsmUnavailable, ...) when
        nothing was changed; the helper undoes its own partial changes then.
        The session lock is not held meanwhile: wraps and unwraps go on.
        """
        try:
            return run_helper(str(self.uri), self._env, changes, registry)
        finally:
            with self._lock:
                # Cached handles carry the old attributes; look them up afresh next time.
                for change in changes:
                    self._handles.pop(object_id(change.key_id, change.version), None)

    def set_usable_in_process(self, key_id: uuid.UUID, version: int, usable: bool) -> bool:
        """The attribute change itself, in this process.  Only the helper (hsmchange.py) calls it.

        Writes only when the object differs: each write is a rewrite of the
        object by some modules.  Returns whether anything was written.
        """
        def op() -> bool:
            key = self._key(key_id, version, fresh=True)
            try:
                if bool(key[Attribute.ENCRYPT]) == usable and bool(key[Attribute.DECRYPT]) == usable:
                    return False
                key[Attribute.ENCRYPT] = usable
                key[Attribute.DECRYPT] = usable
            except p11exc.PKCS11Error as exc:
                raise HsmError(f"the HSM refused to change key {key_id} v{version}: {_describe(exc)}") from exc
            finally:
                self._handles.pop(object_id(key_id, version), None)
            return True

        with self._lock:
            return bool(self._call(op))

    def destroy_key(self, key_id: uuid.UUID, version: int) -> None:
        def op() -> None:
            key = self._key(key_id, version)
            try:
                key.destroy()
            except p11exc.PKCS11Error as exc:
                raise HsmError(f"the HSM could not destroy key {key_id} v{version}: {_describe(exc)}") from exc
            self._handles.pop(object_id(key_id, version), None)

        with self._lock:
            self._call(op)
        log.warning("destroyed CMK %s version %d in the HSM", key_id, version)

    # ------------------------------------------------------------------ bring your own key

    def import_public_key(self, key_id: uuid.UUID) -> tuple[int, int]:
        """The RSA wrapping key for importing material into ``key_id``, made on first use.

        Returns (modulus, public exponent).  The private half never leaves the HSM.
        """
        oid = _import_object_id(key_id)
        with self._lock:
            return self._call(lambda: self._import_public_key(key_id, oid))

    def _import_public_key(self, key_id: uuid.UUID, oid: bytes) -> tuple[int, int]:
        try:
            public = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=oid)
        except p11exc.NoSuchKey:
            try:
                public, _private = self._session.generate_keypair(
                    KeyType.RSA, 3072, id=oid, label=f"kmsfs:{key_id}:import", store=True,
                    mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                    public_template={Attribute.ENCRYPT: True, Attribute.WRAP: True, Attribute.VERIFY: False},
                    private_template={
                        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                        Attribute.DECRYPT: False, Attribute.UNWRAP: True, Attribute.SIGN: False,
                    },
                )
            except p11exc.PKCS11Error as exc:
                raise HsmError(f"the HSM could not make an import key pair: {_describe(exc)}") from exc
        except p11exc.PKCS11Error as exc:
            raise HsmError(f"HSM lookup of the import key failed: {_describe(exc)}") from exc
        return (
            int.from_bytes(public[Attribute.MODULUS], "big"),
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
        )

    def import_key(self, key_id: uuid.UUID, version: int, wrapped_material: bytes) -> None:
        """Unwrap RSAES-OAEP wrapped AES-256 material into a non-extractable key.

        SHA-256 OAEP is tried first; SHA-1 OAEP second, because SoftHSM2 2.6
        unwraps only with SHA-1.  OAEP decoding under the wrong hash fails its
        integrity check, so trying both can never accept wrong material.
        """
        oid = _import_object_id(key_id)
        template = {
            Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.WRAP: False,
            Attribute.UNWRAP: False, Attribute.MODIFIABLE: True,
        }
        with self._lock:
            self._call(lambda: self._import_key(key_id, version, wrapped_material, oid, template))

    def _import_key(self, key_id: uuid.UUID, version: int, wrapped_material: bytes, oid: bytes,
                    template: dict[Any, Any]) -> None:
        try:
            private = self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=oid)
        except p11exc.NoSuchKey as exc:
            raise HsmKeyMissing("no import wrapping key: read wrapping-key.pem first") from exc
        errors = []
        for digest, mgf in ((Mechanism.SHA256, MGF.SHA256), (Mechanism.SHA_1, MGF.SHA1)):
            try:
                key = private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped_material,
                    id=object_id(key_id, version), label=object_label(key_id, version),
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(digest, mgf, None),
                    store=True, template=template,
                )
            except p11exc.PKCS11Error as exc:
                errors.append(f"OAEP {digest.name}: {_describe(exc)}")
                continue
            self._handles[object_id(key_id, version)] = key
            log.info("imported key material for CMK %s version %d (OAEP %s)", key_id, version, digest.name)
            return
        hint = ""
        if errors and errors[0].endswith(("ArgumentsBad", "MechanismParamInvalid")):
            # SoftHSM2 2.6 refuses any OAEP hash but SHA-1 with CKR_ARGUMENTS_BAD.
            hint = (" (this HSM does not unwrap RSAES-OAEP with SHA-256; SoftHSM2 2.6 only supports "
                    "SHA-1: wrap the key with RSAES-OAEP SHA-1, MGF1 SHA-1, no label)")
        raise HsmUnwrapFailed(
            "the HSM could not import the key material (a 32-byte AES key wrapped with "
            f"RSAES-OAEP under wrapping-key.pem): {'; '.join(errors)}{hint}"
        )

    # ------------------------------------------------------------------ use

    def wrap(self, key_id: uuid.UUID, version: int, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-GCM encrypt small data inside the HSM.  Returns (nonce, ciphertext||tag)."""
        nonce = os.urandom(NONCE_SIZE)

        def op() -> Any:
            key = self._capable(key_id, version, "encrypt")
            try:
                return key.encrypt(
                    plaintext, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS),
                )
            except p11exc.PKCS11Error as exc:
                raise self._use_error(exc, key_id, version, "encrypt") from exc

        with self._lock:
            self.calls["encrypt"] += 1
            sealed = self._call(op)
        return nonce, bytes(sealed)

    def unwrap(self, key_id: uuid.UUID, version: int, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        """AES-GCM decrypt inside the HSM; HsmUnwrapFailed when anything was altered."""
        if len(nonce) != NONCE_SIZE or len(sealed) < TAG_SIZE:
            raise HsmUnwrapFailed("wrapped data has a wrong length")
        def op() -> Any:
            key = self._capable(key_id, version, "decrypt")
            try:
                return key.decrypt(
                    sealed, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS),
                )
            except p11exc.PKCS11Error as exc:
                raise self._use_error(exc, key_id, version, "decrypt") from exc

        with self._lock:
            self.calls["decrypt"] += 1
            plain = self._call(op)
        return bytes(plain)

    def wrap_dek(self, key_id: uuid.UUID, version: int, dek: bytes, aad: bytes) -> tuple[bytes, bytes]:
        if len(dek) != DEK_SIZE:
            raise ValueError("a DEK is 32 bytes")
        return self.wrap(key_id, version, dek, aad)

    def unwrap_dek(self, key_id: uuid.UUID, version: int, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        dek = self.unwrap(key_id, version, nonce, wrapped, aad)
        if len(dek) != DEK_SIZE:
            raise HsmUnwrapFailed("unwrapped data key has a wrong length")
        return dek

    # ------------------------------------------------------------------ internals

    def _key(self, key_id: uuid.UUID, version: int, fresh: bool = False) -> Any:
        oid = object_id(key_id, version)
        key = None if fresh else self._handles.get(oid)
        if key is None:
            try:
                key = self._session.get_key(object_class=ObjectClass.SECRET_KEY, id=oid)
            except p11exc.NoSuchKey as exc:
                raise HsmKeyMissing(f"CMK {key_id} version {version} is not in the HSM") from exc
            except p11exc.PKCS11Error as exc:
                raise HsmError(f"HSM lookup of CMK {key_id} v{version} failed: {_describe(exc)}") from exc
            self._handles[oid] = key
        return key

    def _capable(self, key_id: uuid.UUID, version: int, function: str) -> Any:
        """The key's handle, able to ``function``.

        python-pkcs11 gives a key object encrypt/decrypt methods only if its
        CKA_ENCRYPT/CKA_DECRYPT were true when it was looked up, so a handle
        cached before an enable (here or by another process) is looked up again.
        """
        key = self._key(key_id, version)
        if not hasattr(key, function):
            key = self._key(key_id, version, fresh=True)
            if not hasattr(key, function):
                raise HsmKeyRefused(f"the HSM refuses to {function} with CMK {key_id} v{version} (key disabled)")
        return key

    def _use_error(self, exc: Exception, key_id: uuid.UUID, version: int, op: str) -> HsmError:
        if _code(exc) == CKR_KEY_FUNCTION_NOT_PERMITTED:
            return HsmKeyRefused(f"the HSM refuses to {op} with CMK {key_id} v{version} (key disabled)")
        if isinstance(exc, (p11exc.ObjectHandleInvalid, p11exc.KeyHandleInvalid)):
            self._handles.pop(object_id(key_id, version), None)
            return HsmKeyMissing(f"CMK {key_id} version {version} is no longer in the HSM")
        if op == "decrypt" and isinstance(
            exc, (p11exc.GeneralError, p11exc.EncryptedDataInvalid, p11exc.EncryptedDataLenRange)
        ):
            # SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR.
            return HsmUnwrapFailed(f"CMK {key_id} v{version} could not unwrap: data or context altered")
        return HsmError(f"HSM {op} with CMK {key_id} v{version} failed: {_describe(exc)}")


def _is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or the python-pkcs11 error behind it) says the session or token is gone."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _CONNECTION_ERRORS):
            return True
        seen = seen.__cause__
    return False


def _code(exc: Exception) -> int | None:
    text = str(exc)
    if "0x" in text:
        try:
            return int(text.rsplit("0x", 1)[1].split()[0], 16)
        except ValueError:
            return None
    return None


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
