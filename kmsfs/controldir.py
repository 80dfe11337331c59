"""The control directory ``MOUNTPOINT/.kmsfs/``: a KMS as virtual files.

Each write(2) to a control file is one command, applied at once, as in
sysfs: ``echo Disabled > .kmsfs/keys/NAME/state``.  A bad command fails that
write with EINVAL (or EPERM / EACCES) and changes nothing; the reason is in
``audit.log`` and the daemon log.  Transactional files (``encrypt``,
``decrypt``, ...) take a JSON request written on an open file and answer it
on the next read of the same open file.

Read-only content is generated when the file is opened, so a reader sees
one consistent snapshot.  Control files are served with direct_io: the
kernel never caches them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .kms import Caller, KeyService, KmsError, RewrapProgress, parse_request
from .keyregistry import KeyNotFound, KeyRecord

log = logging.getLogger(__name__)

CONTROL_NAME = b".kmsfs"
CONTROL_BASE = 1 << 63

DIR = "dir"
RO = "ro"
RW = "rw"
WO = "wo"
TXN = "txn"

TOP_FILES: dict[str, str] = {
    "README": RO, "status": RO, "audit.log": RO, "default-key": RW,
    "create-key": TXN, "decrypt": TXN, "reencrypt": TXN,
}
KEY_FILES: dict[str, str] = {
    "info": RO, "state": RW, "description": RW, "rotate": WO, "rotation": RW, "deletion": RW,
    "rewrap": RW, "grants": RW, "encrypt": TXN, "generate-data-key": TXN,
}
IMPORT_FILES: dict[str, str] = {"wrapping-key.pem": RO, "material": WO}

#: The largest command, or transactional request, in bytes.  A write(2) larger
#: than the kernel's max_write arrives here in pieces, and a piece must never be
#: taken for a whole command: anything near that size is refused instead.
MAX_COMMAND = 64 * 1024

README_TEXT = """\
kmsfs control directory
=======================

Every file here is virtual.  Each write(2) to a file is one command, applied at
once; a bad command fails with EINVAL (or EPERM, EACCES) and changes nothing.
A command, or a request to a file that answers it, is at most 64 KiB.
The reason for every refusal is in audit.log and in the daemon's log.

README                 this text
status                 JSON: store id, format version, block size, HSM module and token, default key,
                       counts, the HSM calls since mount (hsm_calls), the DEK cache (dek_cache),
                       the prefetch helper (prefetch), the client spin helper (client_spin),
                       the decrypt helper (decrypt_helper), the header memo (header_memo),
                       the reads around the page cache (direct_read), the write requests
                       (write_requests) and the large writes made on the loop (write_on_loop)
audit.log              JSON lines: time, uid, operation, key, result (and reason)
default-key            alias of the CMK for new files where no directory names one (user.kmsfs.key)
create-key             write {"Alias": "...", "Description": "...", "Origin": "EXTERNAL"}, read the answer
decrypt                write {"CiphertextBlob": "...", "EncryptionContext": "{...}"}, read {"KeyId", "Plaintext"}
reencrypt              write {"CiphertextBlob", "DestinationKeyId", "SourceEncryptionContext",
                       "DestinationEncryptionContext"}, read {"CiphertextBlob", "KeyId", ...}
keys/                  one directory per CMK, named by alias.  mkdir keys/NAME creates a key;
                       mv keys/A keys/B changes its alias.
keys/NAME/info         JSON KeyMetadata: KeyId, Alias, Description, KeyState, Origin, Owner,
                       CreateTime, KeyRotationEnabled, RotateDays, LastRotateTime,
                       NextRotateTime, DeletionDate, CurrentVersion
keys/NAME/state        Enabled, Disabled, PendingDelete or PendingImport; write Enabled or Disabled
                       (the HSM change runs in a helper that survives a kill: ~0.2 s)
keys/NAME/description  free text, up to 1024 bytes
keys/NAME/rotate       any write creates a new key version at once
keys/NAME/rotation     off, or a period in days (7-365) for automatic rotation
keys/NAME/deletion     write days (7-30) to schedule deletion, or cancel; reads the date or none
keys/NAME/rewrap       write start: rewrap every file under this key onto its newest version
                       (content untouched); reads progress as JSON
keys/NAME/grants       lines "uid:N ROLE" or "gid:N ROLE", ROLE use or admin
keys/NAME/encrypt      write {"Plaintext": base64, "EncryptionContext": "{...}"}, read the answer
keys/NAME/generate-data-key  write {"KeySpec": "AES_256", "EncryptionContext": "{...}"}
keys/NAME/import/      bring your own key (keys created with Origin EXTERNAL):
                       read wrapping-key.pem (RSA-3072), encrypt a 32-byte AES key with
                       RSAES-OAEP under it (SHA-1: SoftHSM2 2.6 unwraps no other hash;
                       SHA-256 where the HSM supports it) and write the result to material

Examples:
  mkdir .kmsfs/keys/projects
  echo "for project files" > .kmsfs/keys/projects/description
  echo 30 > .kmsfs/keys/projects/rotation
  echo Disabled > .kmsfs/keys/projects/state
  echo 7 > .kmsfs/keys/projects/deletion ; echo cancel > .kmsfs/keys/projects/deletion
  printf 'uid:1000 use\\n' > .kmsfs/keys/projects/grants
  exec 3<>.kmsfs/keys/projects/encrypt; echo '{"Plaintext":"aGk="}' >&3; cat <&3; exec 3>&-
"""


@dataclass(eq=False)
class Node:
    ino: int
    path: tuple[str, ...]  # ("keys", KeyId, "info"), ...
    kind: str


@dataclass(eq=False)
class ControlHandle:
    node: Node
    caller: Caller
    content: bytes = b""
    answer: bytes | None = None
    #: File offset of the first read of the answer: the answer starts there,
    #: wherever the request's writes left the file position.
    answer_base: int | None = None
    request: bytearray = field(default_factory=bytearray)


class ControlDir:
    """Virtual inodes from CONTROL_BASE upward, stable for the life of the mount."""

    def __init__(
        self,
        kms: KeyService,
        status: Callable[[], dict[str, Any]],
        start_rewrap: Callable[[KeyRecord], Awaitable[None]],
        invalidate_key: Callable[[str], Awaitable[None]],
    ) -> None:
        self.kms = kms
        self._status = status
        self._start_rewrap = start_rewrap
        self._invalidate_key = invalidate_key
        self._by_path: dict[tuple[str, ...], Node] = {}
        self._by_ino: dict[int, Node] = {}
        self.root = self._node(())
        self.owner_uid = kms.admin_uid
        self.owner_gid = 0

    # ------------------------------------------------------------------ nodes

    def owns(self, ino: int) -> bool:
        return ino >= CONTROL_BASE

    def _node(self, path: tuple[str, ...]) -> Node:
        node = self._by_path.get(path)
        if node is None:
            node = Node(CONTROL_BASE + len(self._by_path), path, self._kind(path))
            self._by_path[path] = node
            self._by_ino[node.ino] = node
        return node

    @staticmethod
    def _kind(path: tuple[str, ...]) -> str:
        if path in ((), ("keys",)) or len(path) == 2 or (len(path) == 3 and path[2] == "import"):
            return DIR
        if len(path) == 1:
            return TOP_FILES[path[0]]
        if len(path) == 3:
            return KEY_FILES[path[2]]
        return IMPORT_FILES[path[3]]

    def parent(self, node: Node) -> Node:
        path = node.path[:-1]
        return self._by_path.get(path) or self._node(path)

    def node(self, ino: int) -> Node:
        node = self._by_ino.get(ino)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _key(self, node: Node) -> KeyRecord:
        try:
            return self.kms.snapshot().resolve(node.path[1])
        except KeyNotFound:
            raise FUSEError(errno.ENOENT) from None

    def children(self, node: Node) -> list[tuple[str, Node]]:
        path = node.path
        if node.kind != DIR:
            raise FUSEError(errno.ENOTDIR)
        if path == ():
            return [(name, self._node((name,))) for name in ["keys", *TOP_FILES]]
        if path == ("keys",):
            keys = sorted(self.kms.snapshot().keys.values(), key=lambda k: k.Alias)
            return [(k.Alias, self._node(("keys", k.KeyId))) for k in keys]
        if len(path) == 2:
            self._key(node)
            return [(name, self._node(path + (name,))) for name in [*KEY_FILES, "import"]]
        self._key(node)
        return [(name, self._node(path + (name,))) for name in IMPORT_FILES]

    def lookup(self, parent: Node, name: str) -> Node:
        if parent.path == () and name in TOP_FILES:
            return self._node((name,))
        if parent.path == ("keys",):
            # keys/ lists aliases, and a KeyId names the same directory.
            try:
                return self._node(("keys", self.kms.snapshot().resolve(name).KeyId))
            except KeyNotFound:
                raise FUSEError(errno.ENOENT) from None
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise FUSEError(errno.ENOENT)

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        # Control state changes behind the kernel's back: never cache it.
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        mode = {DIR: stat.S_IFDIR | 0o755, RO: stat.S_IFREG | 0o444, RW: stat.S_IFREG | 0o666,
                WO: stat.S_IFREG | 0o222, TXN: stat.S_IFREG | 0o666}[node.kind]
        if node.path == ("keys",):
            mode = stat.S_IFDIR | 0o777  # anyone may try mkdir; the KMS decides
        entry.st_mode = mode
        entry.st_nlink = 2 if node.kind == DIR else 1
        entry.st_uid = self.owner_uid
        entry.st_gid = self.owner_gid
        entry.st_size = 0
        entry.st_blksize = 4096
        now = time.time_ns()
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = now
        return entry

    # ------------------------------------------------------------------ directory changes

    async def mkdir(self, parent: Node, name: str, caller: Caller) -> Node:
        if parent.path != ("keys",):
            raise self._refused(caller, parent, KmsError(
                errno.EPERM, "directories can only be made in keys/ (mkdir keys/ALIAS creates a key)"))
        try:
            record = await trio.to_thread.run_sync(self.kms.create_key, caller, name)
        except KmsError as exc:
            raise self._refused(caller, parent, exc) from None
        return self._node(("keys", record.KeyId))

    async def rename(self, old_parent: Node, old: str, new_parent: Node, new: str, caller: Caller) -> None:
        if old_parent.path != ("keys",) or new_parent.path != ("keys",):
            raise self._refused(caller, old_parent, KmsError(
                errno.EPERM, "only keys/ALIAS can be renamed, within keys/ (mv keys/A keys/B changes an alias)"))
        child = self.lookup(old_parent, old)
        try:
            await trio.to_thread.run_sync(self.kms.set_alias, caller, child.path[1], new)
        except KmsError as exc:
            raise self._refused(caller, child, exc) from None

    # ------------------------------------------------------------------ files

    async def open(self, node: Node, flags: int, caller: Caller) -> ControlHandle:
        if node.kind == DIR:
            raise FUSEError(errno.EISDIR)
        handle = ControlHandle(node, caller)
        if flags & os.O_ACCMODE != os.O_RDONLY and node.kind == RO:
            # Root passes the kernel's permission check on mode 0444: refuse here.
            raise self._refused(caller, node, KmsError(errno.EACCES, f"{node.path[-1]} is read-only"))
        if flags & os.O_ACCMODE != os.O_WRONLY and node.kind in (RO, RW):
            try:
                handle.content = await trio.to_thread.run_sync(self._render, node, caller)
            except KmsError as exc:
                raise self._refused(caller, node, exc) from None
        return handle

    async def read(self, handle: ControlHandle, offset: int, size: int) -> bytes:
        if handle.node.kind == TXN:
            if handle.answer is None:
                if not handle.request:
                    return b""
                try:
                    handle.answer = await trio.to_thread.run_sync(
                        self._transact, handle.node, bytes(handle.request), handle.caller)
                except FUSEError:
                    handle.request.clear()  # refused: the next write starts a new request
                    raise
            if handle.answer_base is None:
                handle.answer_base = offset
            start = max(0, offset - handle.answer_base)
            return handle.answer[start:start + size]
        return handle.content[offset:offset + size]

    async def write(self, handle: ControlHandle, offset: int, data: bytes, caller: Caller) -> int:
        node = handle.node
        if node.kind == TXN:
            if handle.answer is not None:  # a new request on the same open file
                handle.request.clear()
            if len(handle.request) + len(data) > MAX_COMMAND:
                handle.request.clear()  # the next write starts a new request
                handle.answer = None
                handle.answer_base = None
                raise self._refused(caller, node, KmsError(
                    errno.EINVAL, f"request larger than {MAX_COMMAND // 1024} KiB"))
            handle.request += data
            handle.answer = None
            handle.answer_base = None
            try:
                request = parse_request(bytes(handle.request))
            except KmsError:
                return len(data)  # not complete yet; answered (or refused) at read
            try:
                handle.answer = await trio.to_thread.run_sync(
                    self._transact, node, bytes(handle.request), caller, request)
            except FUSEError:
                handle.request.clear()  # refused: the next write starts a new request
                raise
            return len(data)
        if node.kind == RO:
            raise FUSEError(errno.EBADF)
        if len(data) > MAX_COMMAND:
            raise self._refused(caller, node, KmsError(
                errno.EINVAL, f"command larger than {MAX_COMMAND // 1024} KiB"))
        try:
            await self._command(node, data, caller)
        except KmsError as exc:
            raise self._refused(caller, node, exc) from None
        return len(data)

    # ------------------------------------------------------------------ content

    def _render(self, node: Node, caller: Caller) -> bytes:
        path = node.path
        if path == ("README",):
            return README_TEXT.encode()
        if path == ("status",):
            return _json(self._status())
        if path == ("audit.log",):
            return self.kms.read_audit()
        if path == ("default-key",):
            try:
                return (self.kms.snapshot().default().Alias + "\n").encode()
            except KeyNotFound:
                return b"\n"
        record = self._key(node)
        name = path[-1]
        if name == "info":
            return _json(self.kms.info(record))
        if name == "state":
            return (record.KeyState + "\n").encode()
        if name == "description":
            return (record.Description + "\n").encode() if record.Description else b""
        if name == "rotation":
            return (f"{record.RotateDays}\n" if record.KeyRotationEnabled else "off\n").encode()
        if name == "deletion":
            if not record.DeletionDate:
                return b"none\n"
            return (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.DeletionDate)) + "\n").encode()
        if name == "rewrap":
            return _json(self.kms.rewraps.get(record.KeyId, RewrapProgress()).to_json())
        if name == "grants":
            return self.kms.format_grants(record).encode()
        if name == "wrapping-key.pem":
            return self.kms.wrapping_key_pem(caller, record.KeyId)
        return b""

    async def _command(self, node: Node, data: bytes, caller: Caller) -> None:
        if node.path[-1] in ("state", "deletion") and len(node.path) == 3:
            # Before a key can stop working: have the kernel write back pages it
            # still holds for files under it, while writes are still accepted.
            await self._invalidate_key(node.path[1])
        # Lifecycle changes touch the HSM and fsync the registry: off the trio loop.
        follow_up = await trio.to_thread.run_sync(self._apply, node, data, caller)
        if follow_up == "invalidate":
            await self._invalidate_key(node.path[1])
        elif follow_up == "rewrap":
            key_id = node.path[1]
            try:
                await self._start_rewrap(self._key(node))
            except FUSEError:
                self.kms.audit(caller, "Rewrap", key_id, "refused", "a rewrap of this key is running already")
                raise
            self.kms.audit(caller, "Rewrap", key_id, "ok")

    def _apply(self, node: Node, data: bytes, caller: Caller) -> str | None:
        """Apply one command; returns what the frontend must do next, if anything."""
        path = node.path
        if path == ("default-key",):
            self.kms.set_default(caller, _text(data))
            return None
        record = self._key(node)
        key_id = record.KeyId
        name = path[-1]
        if name == "material":
            self.kms.import_material(caller, key_id, bytes(data))
            return None
        text = _text(data)
        if name == "state":
            self.kms.set_state(caller, key_id, text)
            return "invalidate" if text != "Enabled" else None
        if name == "description":
            self.kms.set_description(caller, key_id, text)
        elif name == "rotate":
            self.kms.rotate(caller, key_id)
        elif name == "rotation":
            days = None if text == "off" else _int(text, "rotation: write off or a number of days (7-365)")
            self.kms.set_rotation(caller, key_id, days)
        elif name == "deletion":
            if text == "cancel":
                self.kms.cancel_deletion(caller, key_id)
                return None
            self.kms.schedule_deletion(caller, key_id, _int(text, "deletion: write a number of days (7-30) or cancel"))
            return "invalidate"
        elif name == "rewrap":
            if text != "start":
                raise KmsError(errno.EINVAL, "rewrap: write start")
            self.kms.require(caller, record, "admin", "Rewrap")
            return "rewrap"
        elif name == "grants":
            self.kms.set_grants(caller, key_id, text)
        else:
            raise KmsError(errno.EPERM, f"{name} cannot be written")
        return None

    def _transact(self, node: Node, raw: bytes, caller: Caller | None,
                  parsed: dict[str, Any] | None = None) -> bytes:
        try:
            request = parsed if parsed is not None else parse_request(raw)
            path = node.path
            if path == ("decrypt",):
                answer = self.kms.decrypt(caller, request)
            elif path == ("reencrypt",):
                answer = self.kms.reencrypt(caller, request)
            elif path == ("create-key",):
                alias = request.get("Alias")
                if not isinstance(alias, str):
                    raise KmsError(errno.EINVAL, "Alias is required")
                description = request.get("Description", "")
                origin = request.get("Origin", "KMSFS")
                if not isinstance(description, str) or origin not in ("KMSFS", "EXTERNAL"):
                    raise KmsError(errno.EINVAL, "Description must be text and Origin KMSFS or EXTERNAL")
                answer = {"KeyMetadata": self.kms.info(self.kms.create_key(caller, alias, description, origin))}
            elif path[-1] == "encrypt":
                answer = self.kms.encrypt(caller, path[1], request)
            elif path[-1] == "generate-data-key":
                answer = self.kms.generate_data_key(caller, path[1], request)
            else:
                raise KmsError(errno.EPERM, "not a transactional file")
        except KmsError as exc:
            raise self._refused(caller, node, exc) from None
        return _json(answer)

    # ------------------------------------------------------------------ errors

    def _refused(self, caller: Caller | None, node: Node, exc: KmsError) -> FUSEError:
        """Log and audit a refused write (once), and the errno for the caller."""
        where = "/".join(node.path)
        if not exc.audited:
            key = node.path[1] if len(node.path) > 1 and node.path[0] == "keys" else ""
            self.kms.audit(caller, f"write {where}", key, "refused", str(exc))
        log.warning("control write to .kmsfs/%s refused: %s", where, exc)
        return FUSEError(exc.errno)


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8", "strict").strip()
    except UnicodeDecodeError:
        raise KmsError(errno.EINVAL, "not UTF-8 text") from None


def _int(text: str, message: str) -> int:
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٣٠".
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise KmsError(errno.EINVAL, message)
    return int(text)
