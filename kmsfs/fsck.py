"""``kmsfs fsck``: check every header with the HSM and every block of an unmounted store.

Read-only: nothing in the store is changed.  Exit codes follow fsck(8):

    0  clean
    4  damage found (each damaged file is listed with its cause and blocks)
    8  unable to check (not a store, store mounted, HSM unavailable, ...)
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .contentcrypt import BlockAuthError, ContentCipher
from .envelope import Envelope, HeaderError, KeyUnusable
from .format import HEADER_XATTR, FormatError, ciphertext_block_size, plaintext_size
from .keyregistry import KeyNotFound, KeyRegistry, key_changes_settled
from .keystore import HsmError, HsmKeyRefused, HsmUnwrapFailed, KeyStore
from .store import StoreError, load_config
from .treewalk import iter_regular_files
from .truncation import TruncationJournal

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_DAMAGE = 4
EXIT_UNABLE = 8

#: Blocks decrypted per pread while checking content.
CHECK_BLOCKS = 256

# Causes, as listed in the report.
TAMPERED_BLOCK = "tampered block"
WRONG_HEADER = "wrong header"
MISSING_HEADER = "missing header"
UNKNOWN_KEY = "unknown key"
DESTROYED_KEY = "destroyed key"
KEY_DISABLED = "key disabled"
BAD_SIZE = "invalid ciphertext size"
UNREADABLE = "unreadable"


class FsckError(Exception):
    """The store cannot be checked at all."""


@dataclass
class Damage:
    path: str
    cause: str
    detail: str = ""
    blocks: list[int] = field(default_factory=list)


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    damaged: list[Damage] = field(default_factory=list)
    headerless_nonempty: int = 0
    nonempty: int = 0
    #: Truncates a killed daemon left unfinished; the next mount completes them.
    pending_truncates: int = 0

    @property
    def stripped_xattrs(self) -> bool:
        """Every non-empty file lost its header: a copy without xattrs."""
        return self.nonempty > 0 and self.headerless_nonempty == self.nonempty

    def to_json(self) -> dict[str, object]:
        return {
            "files_checked": self.files,
            "bytes_checked": self.bytes,
            "clean": not self.damaged,
            "xattrs_stripped": self.stripped_xattrs,
            "damaged": [asdict(d) for d in self.damaged],
            "pending_truncates": self.pending_truncates,
        }


STRIPPED_XATTRS_MESSAGE = (
    "no file in this store has its header (xattr user.kmsfs): the store was copied with a tool "
    "that drops extended attributes (plain cp, rsync without -X, tar without --xattrs), and every "
    "file's data key is in those headers. Copy the store again from the original with "
    "'cp -a', 'rsync -aX' or 'tar --xattrs', or restore the headers with "
    "'kmsfs headers import BACKING HEADERS_FILE' from an export."
)


def open_store(backing: Path) -> tuple[KeyStore, Envelope]:
    try:
        config = load_config(backing)
        keystore = KeyStore(config.uri(), config.hsm_env)
    except (StoreError, HsmError) as exc:
        raise FsckError(str(exc)) from None
    return keystore, Envelope(keystore, KeyRegistry(backing), config.block_size, config.format_version)


def check_store(backing: Path, progress: Callable[[int, str], None] | None = None) -> Report:
    """Check everything; the caller turns the report into output and an exit code."""
    try:
        # Not in the middle of a key change (its helper may outlive a killed daemon).
        with key_changes_settled(backing):
            keystore, envelope = open_store(backing)
            try:
                envelope.registry.snapshot()
            except StoreError:
                keystore.close()
                raise
    except StoreError as exc:
        raise FsckError(str(exc)) from None
    report = Report(pending_truncates=len(TruncationJournal(backing).pending()))
    try:
        for dir_fd, name, shown in iter_regular_files(backing):
            report.files += 1
            if progress:
                progress(report.files, shown)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                report.damaged.append(Damage(shown, UNREADABLE, os.strerror(exc.errno or errno.EIO)))
                continue
            try:
                damage = _check_file(fd, shown, envelope, report)
            finally:
                os.close(fd)
            if damage is not None:
                report.damaged.append(damage)
    finally:
        keystore.close()
    return report


def _check_file(fd: int, shown: str, envelope: Envelope, report: Report) -> Damage | None:
    size = os.fstat(fd).st_size
    report.bytes += size
    if size:
        report.nonempty += 1
    try:
        raw = os.getxattr(fd, HEADER_XATTR)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            return Damage(shown, UNREADABLE, f"header: {os.strerror(exc.errno or errno.EIO)}")
        if size == 0:
            return None
        report.headerless_nonempty += 1
        return Damage(shown, MISSING_HEADER, "non-empty file without xattr user.kmsfs")
    try:
        header = envelope.parse(raw)
    except HeaderError as exc:
        return Damage(shown, WRONG_HEADER, str(exc))
    if header.block_size != envelope.block_size or header.version != envelope.format_version:
        return Damage(shown, WRONG_HEADER, f"format {header.version} with block size {header.block_size} "
                                           f"differs from the store's")
    try:
        cipher = envelope.open(header)
    except KeyNotFound as exc:
        cause = DESTROYED_KEY if "destroyed" in str(exc) else UNKNOWN_KEY
        return Damage(shown, cause, str(exc))
    except (KeyUnusable, HsmKeyRefused) as exc:
        return Damage(shown, KEY_DISABLED, str(exc))
    except HsmUnwrapFailed as exc:
        return Damage(shown, WRONG_HEADER, str(exc))
    except HsmError as exc:
        if "no longer in the HSM" in str(exc) or "is not in the HSM" in str(exc):
            return Damage(shown, DESTROYED_KEY, str(exc))
        raise FsckError(f"the HSM failed while checking {shown}: {exc}") from exc
    bad_size = ""
    try:
        plaintext_size(size, header.block_size)
    except FormatError as exc:
        bad_size = str(exc)
    bad_blocks = _bad_blocks(fd, size, cipher)
    if bad_size:
        return Damage(shown, BAD_SIZE, bad_size, bad_blocks)
    if bad_blocks:
        return Damage(shown, TAMPERED_BLOCK, "authentication failed", bad_blocks)
    return None


def _bad_blocks(fd: int, size: int, cipher: ContentCipher) -> list[int]:
    cbs = ciphertext_block_size(cipher.block_size)
    bad: list[int] = []
    total = -(-size // cbs)
    first = 0
    while first < total:
        count = min(CHECK_BLOCKS, total - first)
        data = os.pread(fd, count * cbs, first * cbs)
        try:
            cipher.decrypt(data, first)
        except BlockAuthError:
            # Find every bad block in this run, one by one.
            for i in range(count):
                block = data[i * cbs:(i + 1) * cbs]
                try:
                    cipher.decrypt(block, first + i)
                except BlockAuthError:
                    bad.append(first + i)
        first += count
    return bad
