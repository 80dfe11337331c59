"""``kmsfs headers export|import``: save and restore every file's wrapped header.

A store copied without its xattrs has lost every file's header, and with it
every DEK.  An export holds no secret (each DEK in it is wrapped by a CMK in
the HSM), so it can be kept next to the backups.

Export format (JSON)::

    {"format": "kmsfs-headers", "version": 1, "store_id": "...",
     "files": [{"path": "dir/name", "path_b64": "...", "header": "<base64>"}, ...]}

``path`` is for people; ``path_b64`` holds the exact name bytes.  Import
puts a header back only on a file that has none (or, with ``force``, a
different one), and only after the HSM unwrapped it and it decrypted the
file's first block, so a header is never attached to the wrong file.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .contentcrypt import BlockAuthError
from .envelope import Envelope, HeaderError, KeyUnusable
from .format import HEADER_XATTR, ciphertext_block_size
from .fsck import FsckError, open_store
from .keyregistry import KeyNotFound
from .keystore import HsmError
from .mounttable import mounted_store_mountpoint
from .store import StoreError, atomic_write, load_config
from .treewalk import iter_regular_files

log = logging.getLogger(__name__)

EXPORT_FORMAT = "kmsfs-headers"
EXPORT_VERSION = 1


class HeadersError(Exception):
    pass


@dataclass
class ImportResult:
    restored: int = 0
    already: int = 0
    missing_files: int = 0
    mismatched: int = 0
    skipped_different: int = 0


def export_headers(backing: Path, destination: Path) -> int:
    try:
        config = load_config(backing)
    except StoreError as exc:
        raise HeadersError(str(exc)) from None
    files = []
    for dir_fd, name, shown in iter_regular_files(backing):
        try:
            raw = _getxattr_at(dir_fd, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise HeadersError(f"cannot read the header of {shown}: {os.strerror(exc.errno or 0)}") from exc
        files.append({
            "path": shown.encode("utf-8", "replace").decode("utf-8"),
            "path_b64": base64.b64encode(os.fsencode(shown)).decode(),
            "header": base64.b64encode(raw).decode(),
        })
    document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "store_id": config.store_id, "files": files}
    atomic_write(destination, (json.dumps(document, indent=1) + "\n").encode(), mode=0o600)
    return len(files)


def _getxattr_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.getxattr(f"/proc/self/fd/{fd}", HEADER_XATTR)
    finally:
        os.close(fd)


def import_headers(backing: Path, source: Path, force: bool = False) -> ImportResult:
    try:
        document = json.loads(source.read_bytes())
    except (OSError, ValueError) as exc:
        raise HeadersError(f"cannot read {source}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise HeadersError(f"{source} is not a kmsfs headers export")
    if document.get("version") != EXPORT_VERSION:
        raise HeadersError(f"{source} is a headers export of version {document.get('version')}; "
                           f"this kmsfs reads version {EXPORT_VERSION}")
    try:
        config = load_config(backing)
    except StoreError as exc:
        raise HeadersError(str(exc)) from None
    where = mounted_store_mountpoint(backing)
    if where is not None:
        raise HeadersError(f"{backing} is mounted on {where}; unmount it first")
    if document.get("store_id") != config.store_id:
        raise HeadersError(f"{source} was exported from store {document.get('store_id')}, "
                           f"not from this store ({config.store_id})")
    try:
        keystore, envelope = open_store(backing)
    except FsckError as exc:
        raise HeadersError(str(exc)) from None
    result = ImportResult()
    try:
        for entry in document.get("files", []):
            rel = os.fsdecode(base64.b64decode(entry["path_b64"]))
            raw = base64.b64decode(entry["header"])
            path = backing / rel
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                result.missing_files += 1
                continue
            try:
                _restore_one(fd, rel, raw, envelope, force, result)
            finally:
                os.close(fd)
    finally:
        keystore.close()
    return result


def _restore_one(fd: int, rel: str, raw: bytes, envelope: Envelope, force: bool, result: ImportResult) -> None:
    try:
        current = os.getxattr(fd, HEADER_XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        current = None
    if current == raw:
        result.already += 1
        return
    if current is not None and not force:
        result.skipped_different += 1
        log.warning("%s has a different header; not replaced (use --force)", rel)
        return
    try:
        header = envelope.parse(raw)
        cipher = envelope.open(header)
        size = os.fstat(fd).st_size
        if size:
            cbs = ciphertext_block_size(header.block_size)
            cipher.decrypt(os.pread(fd, min(size, cbs), 0), 0)
    except (HeaderError, HsmError, KeyNotFound, KeyUnusable, BlockAuthError) as exc:
        result.mismatched += 1
        log.warning("%s: the exported header does not fit this file: %s", rel, exc)
        return
    os.setxattr(fd, HEADER_XATTR, raw)
    result.restored += 1
