"""The key management service: CMK lifecycle, small-data crypto, grants and audit.

Modelled on Tencent Cloud KMS.  This layer knows nothing about FUSE: the
control directory (controldir.py) and the CLI both call it.  Every method
that changes a key validates its input completely before it changes
anything, records the result in the audit log, and raises KmsError (with an
errno and a message for the caller) when it refuses.

State lives in two places that are kept in step: the key registry (metadata,
keys.json) and the HSM (material, and whether the HSM allows it to be used).
A disable or a scheduled deletion turns off the key's encrypt and decrypt
attributes inside the HSM before the registry says so, so editing keys.json
cannot bring a disabled key back.

Both steps of a state change (enable, disable, schedule deletion) run in one
detached helper process (hsmchange.py), under the registry's lock: a kill of
this process at any moment leaves either the old state in both places or,
once the helper has its job, the new state in both, and never an HSM object
half rewritten.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .format import MAX_CONTEXT_CHARS, canonical_context, parse_context, FormatError
from .keyregistry import (
    DISABLED, ENABLED, ORIGIN_EXTERNAL, ORIGIN_KMSFS, PENDING_DELETE, PENDING_IMPORT,
    KeyNotFound, KeyRecord, KeyRegistry, Registry, new_key_record, validate_alias,
)
from .hsmchange import RegistryWrite, UsableChange
from .keystore import HsmError, HsmUnavailable, KeyStore
from .store import atomic_write, store_dir

log = logging.getLogger(__name__)

MAX_PLAINTEXT = 4096
MAX_DESCRIPTION = 1024
MIN_DELETION_DAYS, MAX_DELETION_DAYS = 7, 30
MIN_ROTATION_DAYS, MAX_ROTATION_DAYS = 7, 365
DAY = 86400

ROLE_USE = "use"
ROLE_ADMIN = "admin"
ROLES = (ROLE_USE, ROLE_ADMIN)

AUDIT_NAME = "audit.log"

# CiphertextBlob, version 1 (base64 in JSON answers):
#   magic "KMSC" | version 1 (u8) | key id (16) | key version (u32 BE) | nonce (12) | ciphertext || tag
# The HSM's AES-GCM associated data is the blob's prefix (up to the key version)
# followed by the canonical encryption context.
_BLOB = struct.Struct(">4sB16sI")
BLOB_MAGIC = b"KMSC"
BLOB_VERSION = 1


class KmsError(Exception):
    """A refused KMS request.  ``errno`` goes to the caller, the message to the log/CLI."""

    def __init__(self, code: int, message: str, audited: bool = False) -> None:
        super().__init__(message)
        self.errno = code
        #: True once a line for this refusal is in the audit log.
        self.audited = audited


def invalid(message: str) -> KmsError:
    return KmsError(errno.EINVAL, message)


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass
class RewrapProgress:
    state: str = "idle"  # idle | running | done | failed
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    started: int = 0
    finished: int = 0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class KeyService:
    def __init__(self, backing: Path, keystore: KeyStore, registry: KeyRegistry, admin_uid: int) -> None:
        self.backing = backing
        self.keystore = keystore
        self.registry = registry
        self.admin_uid = admin_uid
        self._audit_path = store_dir(backing) / AUDIT_NAME
        self._audit_lock = threading.Lock()
        self.rewraps: dict[str, RewrapProgress] = {}

    # ================================================================ audit and permissions

    def audit(self, caller: Caller | None, operation: str, key: str, result: str, reason: str = "") -> None:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "uid": caller.uid if caller else None,
            "operation": operation,
            "key": key,
            "result": result,
        }
        if reason:
            entry["reason"] = reason
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._audit_lock:
            fd = os.open(self._audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def read_audit(self) -> bytes:
        try:
            return self._audit_path.read_bytes()
        except FileNotFoundError:
            return b""

    def role_of(self, caller: Caller, key: KeyRecord) -> str | None:
        if caller.uid in (0, self.admin_uid):
            return ROLE_ADMIN
        roles = set()
        role = key.Grants.get(f"uid:{caller.uid}")
        if role:
            roles.add(role)
        for gid in {caller.gid, *caller.groups}:
            role = key.Grants.get(f"gid:{gid}")
            if role:
                roles.add(role)
        if ROLE_ADMIN in roles:
            return ROLE_ADMIN
        if ROLE_USE in roles:
            return ROLE_USE
        return None

    def require(self, caller: Caller | None, key: KeyRecord, role: str, operation: str) -> None:
        """EACCES (and an audit line) unless ``caller`` holds ``role`` on ``key``."""
        if caller is None:
            return  # the store's owner working on an unmounted store
        held = self.role_of(caller, key)
        if held == ROLE_ADMIN or held == role:
            return
        self.audit(caller, operation, key.KeyId, "denied", f"needs {role} grant")
        raise KmsError(errno.EACCES, f"uid {caller.uid} has no {role} grant on key {key.Alias}", audited=True)

    def _is_admin(self, caller: Caller | None) -> bool:
        return caller is None or caller.uid in (0, self.admin_uid)

    # ================================================================ lookup

    def snapshot(self) -> Registry:
        return self.registry.snapshot()

    def resolve(self, ref: str) -> KeyRecord:
        try:
            return self.registry.snapshot().resolve(ref)
        except KeyNotFound as exc:
            raise KmsError(errno.ENOENT, str(exc)) from None

    def _mutate(self, caller: Caller | None, operation: str, ref: str,
                change: Callable[[Registry, KeyRecord], Any],
                hsm_changes: list[UsableChange] | None = None) -> Any:
        """Apply ``change`` under the registry lock; audit success or refusal.

        Attribute changes that ``change`` puts into ``hsm_changes`` are made
        together with the keys.json write, in the helper (see _commit_with).
        """
        key_name = ref

        def apply(reg: Registry) -> Any:
            nonlocal key_name
            try:
                record = reg.resolve(ref)
            except KeyNotFound as exc:
                raise KmsError(errno.ENOENT, str(exc)) from None
            key_name = record.KeyId
            self.require(caller, record, ROLE_ADMIN, operation)
            return change(reg, record)

        try:
            result = self.registry.update(apply, self._commit_with(hsm_changes))
        except KmsError as exc:
            if not exc.audited:
                self.audit(caller, operation, key_name, "refused", str(exc))
                exc.audited = True
            raise
        except HsmError as exc:
            self.audit(caller, operation, key_name, "failed", str(exc))
            raise KmsError(exc.errno, str(exc), audited=True) from exc
        self.audit(caller, operation, key_name, "ok")
        return result

    # ================================================================ create, alias, description

    def create_key(self, caller: Caller | None, alias: str, description: str = "",
                   origin: str = ORIGIN_KMSFS) -> KeyRecord:
        try:
            validate_alias(alias)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if len(description.encode()) > MAX_DESCRIPTION:
            raise invalid(f"a description is at most {MAX_DESCRIPTION} bytes")
        if not self._is_admin(caller):
            self.audit(caller, "CreateKey", alias, "denied", "only the mounting user and root create keys")
            raise KmsError(errno.EACCES, "only the user who mounted the store (or root) can create keys", audited=True)
        owner = str(caller.uid if caller else os.getuid())
        record = new_key_record(alias, owner=owner, origin=origin, description=description)

        def add(reg: Registry) -> KeyRecord:
            if any(k.Alias == alias for k in reg.keys.values()):
                raise KmsError(errno.EEXIST, f"a key with alias {alias!r} exists already")
            if origin == ORIGIN_KMSFS:
                self.keystore.generate_key(record.key_uuid, 1)
            reg.keys[record.KeyId] = record
            return record

        try:
            self.registry.update(add)
        except KmsError as exc:
            self.audit(caller, "CreateKey", alias, "refused", str(exc))
            exc.audited = True
            raise
        except HsmError as exc:
            self.audit(caller, "CreateKey", alias, "failed", str(exc))
            raise KmsError(exc.errno, str(exc), audited=True) from exc
        self.audit(caller, "CreateKey", record.KeyId, "ok")
        return record

    def set_alias(self, caller: Caller | None, ref: str, new_alias: str) -> None:
        try:
            validate_alias(new_alias)
        except ValueError as exc:
            raise invalid(str(exc)) from None

        def change(reg: Registry, record: KeyRecord) -> None:
            if any(k.Alias == new_alias and k.KeyId != record.KeyId for k in reg.keys.values()):
                raise KmsError(errno.EEXIST, f"a key with alias {new_alias!r} exists already")
            record.Alias = new_alias

        self._mutate(caller, "UpdateAlias", ref, change)

    def set_description(self, caller: Caller | None, ref: str, text: str) -> None:
        if len(text.encode()) > MAX_DESCRIPTION:
            raise invalid(f"a description is at most {MAX_DESCRIPTION} bytes")

        def change(reg: Registry, record: KeyRecord) -> None:
            record.Description = text

        self._mutate(caller, "UpdateKeyDescription", ref, change)

    def set_default(self, caller: Caller | None, ref: str) -> None:
        if not self._is_admin(caller):
            self.audit(caller, "SetDefaultKey", ref.strip(), "denied", "only the mounting user and root set the default key")
            raise KmsError(errno.EACCES, "only the user who mounted the store (or root) sets the default key",
                           audited=True)
        try:
            self.registry.snapshot().resolve(ref)
        except KeyNotFound as exc:
            raise invalid(str(exc)) from None  # a bad value written, not a missing file

        def change(reg: Registry, record: KeyRecord) -> None:
            if record.KeyState != ENABLED:
                raise invalid(f"key {record.Alias} is {record.KeyState}; the default key must be Enabled")
            reg.default_key = record.KeyId

        self._mutate(caller, "SetDefaultKey", ref, change)

    # ================================================================ state

    def set_state(self, caller: Caller | None, ref: str, state: str) -> None:
        if state not in (ENABLED, DISABLED):
            raise invalid("write Enabled or Disabled")

        def change(reg: Registry, record: KeyRecord) -> None:
            if record.filesystem_managed and state == DISABLED:
                raise KmsError(errno.EPERM, "the filesystem-managed default key cannot be disabled")
            if record.KeyId == reg.default_key and state == DISABLED:
                raise KmsError(errno.EPERM, "the default key for new files cannot be disabled; change default-key first")
            if record.KeyState == PENDING_DELETE:
                raise KmsError(errno.EPERM, "the key is pending deletion; cancel the deletion first")
            if record.KeyState == PENDING_IMPORT:
                raise KmsError(errno.EPERM, "the key has no material yet; import it first")
            # Set the HSM attributes even when the registry already agrees: this
            # also repairs an HSM left out of step (e.g. by an older kmsfs's crash).
            hsm_changes[:] = self._usable_changes(record, state == ENABLED)
            record.KeyState = state

        hsm_changes: list[UsableChange] = []
        self._mutate(caller, "EnableKey" if state == ENABLED else "DisableKey", ref, change, hsm_changes)

    @staticmethod
    def _usable_changes(record: KeyRecord, usable: bool) -> list[UsableChange]:
        """Switch every version of a key in the HSM on or off."""
        return [UsableChange(record.key_uuid, version, usable) for version in record.Versions]

    def _commit_with(self, hsm_changes: list[UsableChange] | None) -> Callable[[Path, bytes, int], None] | None:
        """How a registry update that carries ``hsm_changes`` is written.

        The helper makes the attribute changes, then writes keys.json, holding
        the registry's lock (``lock_fd``) until it is done.  A version whose
        material is gone from the HSM can be used by nobody either way; it is
        skipped, so that it cannot keep the files of the other versions locked
        up.  Any other HSM failure changes nothing.
        """
        if hsm_changes is None:
            return None

        def commit(path: Path, data: bytes, lock_fd: int) -> None:
            if not hsm_changes:
                atomic_write(path, data)
                return
            missing = self.keystore.set_usable_many(hsm_changes, RegistryWrite(path, data, lock_fd))
            for gone in missing:
                log.error("CMK %s version %d is missing from the HSM (its files are unreadable); "
                          "switched the other versions", gone.key_id, gone.version)

        return commit

    def schedule_deletion(self, caller: Caller | None, ref: str, days: int) -> None:
        if not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
            raise invalid(f"the deletion window is {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} days")

        def change(reg: Registry, record: KeyRecord) -> None:
            if record.filesystem_managed:
                raise KmsError(errno.EPERM, "the filesystem-managed default key cannot be deleted")
            if record.KeyId == reg.default_key:
                raise KmsError(errno.EPERM, "the default key for new files cannot be deleted; change default-key first")
            if record.KeyState == PENDING_DELETE:
                raise invalid("deletion is already scheduled; cancel it first to change the date")
            hsm_changes[:] = self._usable_changes(record, False)
            record.KeyState = PENDING_DELETE
            record.DeletionDate = int(time.time()) + days * DAY

        hsm_changes: list[UsableChange] = []
        self._mutate(caller, "ScheduleKeyDeletion", ref, change, hsm_changes)

    def cancel_deletion(self, caller: Caller | None, ref: str) -> None:
        def change(reg: Registry, record: KeyRecord) -> None:
            if record.KeyState != PENDING_DELETE:
                raise invalid("no deletion is scheduled for this key")
            record.KeyState = DISABLED  # as in Tencent KMS: cancelled keys come back disabled
            record.DeletionDate = 0

        self._mutate(caller, "CancelKeyDeletion", ref, change)

    # ================================================================ rotation

    def rotate(self, caller: Caller | None, ref: str, operation: str = "RotateKey") -> int:
        def change(reg: Registry, record: KeyRecord) -> int:
            if record.KeyState not in (ENABLED, DISABLED):
                raise KmsError(errno.EPERM, f"a {record.KeyState} key cannot be rotated")
            if record.Origin == ORIGIN_EXTERNAL:
                raise KmsError(errno.EPERM, "imported keys cannot be rotated: import a new key and "
                                            "move files to it (setfattr user.kmsfs.key)")
            if operation == "AutoRotateKey" and not (
                record.KeyRotationEnabled and 0 < record.NextRotateTime <= time.time()
            ):
                return record.CurrentVersion  # another mount rotated it first
            version = max(record.Versions, default=0) + 1
            if self.keystore.has_key(record.key_uuid, version):
                # Left by a crash between generating it and recording it: never
                # used (no header names an unrecorded version), so replace it.
                self.keystore.destroy_key(record.key_uuid, version)
            # A disabled key's new version is made disabled: no attribute change afterwards.
            self.keystore.generate_key(record.key_uuid, version, usable=record.KeyState != DISABLED)
            record.Versions.append(version)
            record.CurrentVersion = version
            now = int(time.time())
            record.LastRotateTime = now
            if record.KeyRotationEnabled:
                record.NextRotateTime = now + record.RotateDays * DAY
            return version

        return int(self._mutate(caller, operation, ref, change))

    def set_rotation(self, caller: Caller | None, ref: str, days: int | None) -> None:
        if days is not None and not MIN_ROTATION_DAYS <= days <= MAX_ROTATION_DAYS:
            raise invalid(f"the rotation period is {MIN_ROTATION_DAYS} to {MAX_ROTATION_DAYS} days, or off")

        def change(reg: Registry, record: KeyRecord) -> None:
            if days is None:
                record.KeyRotationEnabled = False
                record.RotateDays = 0
                record.NextRotateTime = 0
                return
            if record.Origin == ORIGIN_EXTERNAL:
                raise KmsError(errno.EPERM, "imported keys cannot rotate automatically")
            record.KeyRotationEnabled = True
            record.RotateDays = days
            base = record.LastRotateTime or int(time.time())
            record.NextRotateTime = max(base + days * DAY, int(time.time()))

        self._mutate(caller, "EnableKeyRotation" if days else "DisableKeyRotation", ref, change)

    # ================================================================ scheduled work

    def run_due(self, now: float | None = None) -> list[str]:
        """Automatic rotations that are due, and deletions whose window has passed."""
        now = time.time() if now is None else now
        done = []
        for record in list(self.registry.snapshot().keys.values()):
            if record.KeyState == PENDING_DELETE and record.DeletionDate and record.DeletionDate <= now:
                self._destroy(record.KeyId)
                done.append(f"destroyed {record.KeyId}")
            elif (record.KeyRotationEnabled and record.NextRotateTime and record.NextRotateTime <= now
                  and record.KeyState == ENABLED):
                try:
                    self.rotate(None, record.KeyId, operation="AutoRotateKey")
                    done.append(f"rotated {record.KeyId}")
                except KmsError as exc:
                    log.error("automatic rotation of %s failed: %s", record.KeyId, exc)
        return done

    def _destroy(self, key_id: str) -> None:
        destroyed = False

        def change(reg: Registry) -> None:
            nonlocal destroyed
            record = reg.keys.get(key_id)
            if record is None or record.KeyState != PENDING_DELETE or not record.DeletionDate:
                return
            if record.filesystem_managed or record.KeyId == reg.default_key:
                raise KmsError(errno.EPERM, "the default key is never destroyed")
            # keys.json is not trusted: a deletion scheduled through kmsfs turned
            # the key off in the HSM first.  A key the HSM still allows to be used
            # was never scheduled for deletion; someone edited the registry.
            for version in record.Versions:
                if self.keystore.is_usable(record.key_uuid, version):
                    raise KmsError(errno.EPERM, f"key {record.Alias} is PendingDelete in keys.json but still "
                                                f"enabled in the HSM: refusing to destroy it")
            for version in list(record.Versions):
                try:
                    self.keystore.destroy_key(record.key_uuid, version)
                except HsmError as exc:
                    if "not in the HSM" not in str(exc):
                        raise
            del reg.keys[key_id]
            reg.destroyed.append(key_id)
            destroyed = True

        try:
            self.registry.update(change)
        except KmsError as exc:
            self.audit(None, "DeleteKey", key_id, "refused", str(exc))
            log.error("not destroying CMK %s: %s", key_id, exc)
            return
        if destroyed:
            self.audit(None, "DeleteKey", key_id, "ok", "deletion window passed; key material destroyed")
            log.warning("CMK %s destroyed: files under it are unrecoverable", key_id)

    # ================================================================ grants

    def set_grants(self, caller: Caller | None, ref: str, text: str) -> None:
        grants: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise invalid(f"grants line {number}: expected 'uid:N ROLE' or 'gid:N ROLE'")
            who, role = parts
            kind, _, number_text = who.partition(":")
            if (kind not in ("uid", "gid") or not (number_text.isascii() and number_text.isdigit())
                    or int(number_text) > 0xFFFFFFFF):
                raise invalid(f"grants line {number}: {who!r} is not uid:N or gid:N")
            if role not in ROLES:
                raise invalid(f"grants line {number}: role {role!r} is not 'use' or 'admin'")
            grants[f"{kind}:{int(number_text)}"] = role

        def change(reg: Registry, record: KeyRecord) -> None:
            record.Grants = grants

        self._mutate(caller, "UpdateGrants", ref, change)

    @staticmethod
    def format_grants(record: KeyRecord) -> str:
        return "".join(f"{who} {role}\n" for who, role in sorted(record.Grants.items()))

    # ================================================================ small-data crypto

    def _usable(self, caller: Caller | None, ref: str, operation: str) -> KeyRecord:
        try:
            record = self.resolve(ref)
        except KmsError as exc:
            raise invalid(str(exc)) from None  # an unknown key in a request is a bad request
        self.require(caller, record, ROLE_USE, operation)
        if record.KeyState != ENABLED:
            self.audit(caller, operation, record.KeyId, "denied", f"key is {record.KeyState}")
            raise KmsError(errno.EACCES, f"key {record.Alias} is {record.KeyState}", audited=True)
        return record

    @staticmethod
    def _context(value: Any) -> bytes:
        if value in (None, ""):
            return b""
        if not isinstance(value, str):
            raise invalid("EncryptionContext must be a JSON string")
        try:
            return canonical_context(parse_context(value))
        except FormatError as exc:
            raise invalid(str(exc)) from None

    def _seal(self, record: KeyRecord, plaintext: bytes, context: bytes) -> bytes:
        prefix = _BLOB.pack(BLOB_MAGIC, BLOB_VERSION, record.key_uuid.bytes, record.CurrentVersion)
        nonce, sealed = self.keystore.wrap(record.key_uuid, record.CurrentVersion, plaintext, prefix + context)
        return prefix + nonce + sealed

    def _open(self, caller: Caller | None, blob: bytes, context: bytes, operation: str) -> tuple[KeyRecord, bytes]:
        if len(blob) < _BLOB.size + 12 + 16:
            raise invalid("CiphertextBlob is too short")
        magic, version, key_bytes, key_version = _BLOB.unpack_from(blob)
        if magic != BLOB_MAGIC or version != BLOB_VERSION:
            raise invalid("CiphertextBlob is not a kmsfs ciphertext of a supported version")
        record = self._usable(caller, str(uuid.UUID(bytes=key_bytes)), operation)
        if key_version not in record.Versions:
            raise invalid(f"key version {key_version} of {record.Alias} does not exist")
        nonce = blob[_BLOB.size:_BLOB.size + 12]
        try:
            plain = self.keystore.unwrap(record.key_uuid, key_version, nonce, blob[_BLOB.size + 12:],
                                         blob[:_BLOB.size] + context)
        except HsmError as exc:
            self.audit(caller, operation, record.KeyId, "failed", str(exc))
            if isinstance(exc, HsmUnavailable):  # not the caller's fault: no EINVAL
                raise KmsError(exc.errno, str(exc), audited=True) from exc
            raise KmsError(errno.EINVAL if exc.errno == errno.EIO else exc.errno,
                           "decryption failed: wrong ciphertext or encryption context", audited=True) from exc
        return record, plain

    def encrypt(self, caller: Caller | None, ref: str, request: dict[str, Any]) -> dict[str, Any]:
        plaintext = _b64_field(request, "Plaintext")
        if len(plaintext) > MAX_PLAINTEXT:
            raise invalid(f"Plaintext is at most {MAX_PLAINTEXT} bytes")
        context = self._context(request.get("EncryptionContext"))
        record = self._usable(caller, ref, "Encrypt")
        blob = self._hsm(lambda: self._seal(record, plaintext, context))
        self.audit(caller, "Encrypt", record.KeyId, "ok")
        return {"CiphertextBlob": base64.b64encode(blob).decode(), "KeyId": record.KeyId}

    def generate_data_key(self, caller: Caller | None, ref: str, request: dict[str, Any]) -> dict[str, Any]:
        spec = request.get("KeySpec", "AES_256")
        sizes = {"AES_256": 32, "AES_128": 16}
        if "NumberOfBytes" in request and "KeySpec" not in request:
            n = request["NumberOfBytes"]
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1024:
                raise invalid("NumberOfBytes must be an integer from 1 to 1024")
            size = n
        elif isinstance(spec, str) and spec in sizes:  # a list or object as KeySpec is no key (unhashable)
            size = sizes[spec]
        else:
            raise invalid("KeySpec must be AES_256 or AES_128")
        context = self._context(request.get("EncryptionContext"))
        record = self._usable(caller, ref, "GenerateDataKey")
        data_key = os.urandom(size)
        blob = self._hsm(lambda: self._seal(record, data_key, context))
        self.audit(caller, "GenerateDataKey", record.KeyId, "ok")
        return {"KeyId": record.KeyId, "Plaintext": base64.b64encode(data_key).decode(),
                "CiphertextBlob": base64.b64encode(blob).decode()}

    def decrypt(self, caller: Caller | None, request: dict[str, Any]) -> dict[str, Any]:
        blob = _b64_field(request, "CiphertextBlob")
        context = self._context(request.get("EncryptionContext"))
        record, plain = self._open(caller, blob, context, "Decrypt")
        self.audit(caller, "Decrypt", record.KeyId, "ok")
        return {"KeyId": record.KeyId, "Plaintext": base64.b64encode(plain).decode()}

    def reencrypt(self, caller: Caller | None, request: dict[str, Any]) -> dict[str, Any]:
        blob = _b64_field(request, "CiphertextBlob")
        dest_ref = request.get("DestinationKeyId")
        if not isinstance(dest_ref, str) or not dest_ref:
            raise invalid("DestinationKeyId is required")
        source_context = self._context(request.get("SourceEncryptionContext", request.get("EncryptionContext")))
        dest_context = self._context(request.get("DestinationEncryptionContext", request.get("EncryptionContext")))
        source, plain = self._open(caller, blob, source_context, "ReEncrypt")
        dest = self._usable(caller, dest_ref, "ReEncrypt")
        new_blob = self._hsm(lambda: self._seal(dest, plain, dest_context))
        self.audit(caller, "ReEncrypt", dest.KeyId, "ok", f"from {source.KeyId}")
        return {"CiphertextBlob": base64.b64encode(new_blob).decode(), "KeyId": dest.KeyId,
                "SourceKeyId": source.KeyId, "ReEncryptedKeyVersion": dest.CurrentVersion}

    @staticmethod
    def _hsm(fn: Callable[[], bytes]) -> bytes:
        try:
            return fn()
        except HsmError as exc:
            raise KmsError(exc.errno, str(exc)) from exc

    # ================================================================ import (bring your own key)

    def wrapping_key_pem(self, caller: Caller | None, ref: str) -> bytes:
        record = self.resolve(ref)
        self.require(caller, record, ROLE_ADMIN, "GetParametersForImport")
        if record.Origin != ORIGIN_EXTERNAL:
            raise KmsError(errno.EPERM, "only keys created for import (Origin EXTERNAL) take key material")
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

        modulus, exponent = self._hsm_tuple(lambda: self.keystore.import_public_key(record.key_uuid))
        public = RSAPublicNumbers(exponent, modulus).public_key()
        return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def import_material(self, caller: Caller | None, ref: str, wrapped: bytes) -> None:
        if not wrapped:
            raise invalid("no key material written")

        def change(reg: Registry, record: KeyRecord) -> None:
            if record.Origin != ORIGIN_EXTERNAL:
                raise KmsError(errno.EPERM, "only keys created for import (Origin EXTERNAL) take key material")
            if record.KeyState != PENDING_IMPORT:
                raise KmsError(errno.EPERM, f"the key is {record.KeyState}; material can only be imported once")
            try:
                self.keystore.import_key(record.key_uuid, 1, wrapped)
            except HsmUnavailable:
                raise  # EIO, as for every other request while the HSM does not answer
            except HsmError as exc:
                raise invalid(str(exc)) from exc
            record.Versions = [1]
            record.CurrentVersion = 1
            record.KeyState = ENABLED

        self._mutate(caller, "ImportKeyMaterial", ref, change)

    @staticmethod
    def _hsm_tuple(fn: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        try:
            return fn()
        except HsmError as exc:
            raise KmsError(exc.errno, str(exc)) from exc

    # ================================================================ views

    @staticmethod
    def info(record: KeyRecord) -> dict[str, Any]:
        data = asdict(record)
        data.pop("Grants", None)
        data["Versions"] = list(record.Versions)
        return data

    def status(self) -> dict[str, Any]:
        reg = self.registry.snapshot()
        states: dict[str, int] = {}
        for record in reg.keys.values():
            states[record.KeyState] = states.get(record.KeyState, 0) + 1
        try:
            default = reg.default()
            default_desc = {"KeyId": default.KeyId, "Alias": default.Alias}
        except KeyNotFound:
            default_desc = None
        return {"keys": len(reg.keys), "key_states": states, "default_key": default_desc,
                "destroyed_keys": len(reg.destroyed)}


def _b64_field(request: dict[str, Any], name: str) -> bytes:
    value = request.get(name)
    if not isinstance(value, str):
        raise invalid(f"{name} (base64) is required")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{name} is not valid base64") from None


def parse_request(raw: bytes) -> dict[str, Any]:
    if len(raw) > 64 * 1024:
        raise invalid("request larger than 64 KiB")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, not JSON, or an integer of more than 4300 digits;
        # RecursionError: arrays or objects nested thousands deep.
        raise invalid(f"request is not a JSON object: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise invalid("request must be a JSON object")
    return value


__all__ = ["KeyService", "KmsError", "Caller", "RewrapProgress", "parse_request", "MAX_CONTEXT_CHARS"]
