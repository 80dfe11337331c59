"""Truncates into the middle of a block that a crash cannot half-do.

Shrinking a file to a size inside a block takes two steps on the backing
file: cut it at the block's start (``ftruncate``), then write the block's
kept bytes back as a shorter block.  A daemon killed between the two would
lose up to a block of data that was already written, perhaps fsynced long
ago.  So before the cut, the new last block (ciphertext, made with the
file's DEK) is saved in an intent record in ``.kmsfs.d/truncating/``; the
record is removed once the block is written.  At the next mount, a record
that is still there (its owner died: its flock is free) is completed before
the mount serves anything.

Record file ``.kmsfs.d/truncating/<st_dev>-<st_ino>`` (hex), JSON::

    {"version": 1, "dev": D, "ino": I, "file_id": "<32 hex>",
     "offset": O, "block": "<hex of the new last block>"}

Completing it: find the regular file with that inode and file id, cut it at
O and write the block at O.  Both steps are idempotent.  The owner holds an
exclusive flock on the record while the truncate runs, so that another
mount of the same store never completes a truncate that is still running.
The record holds no key and no plaintext.  It is written without fsync: it
protects against a killed daemon, not against a power loss (see
docs/operations.md).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .format import HEADER_XATTR, FormatError, parse_header
from .store import store_dir
from .treewalk import iter_regular_files

log = logging.getLogger(__name__)

INTENT_DIR = "truncating"
RECORD_VERSION = 1


@dataclass(frozen=True)
class TruncateIntent:
    dev: int
    ino: int
    file_id: bytes
    offset: int
    block: bytes

    def to_json(self) -> bytes:
        return json.dumps({
            "version": RECORD_VERSION, "dev": self.dev, "ino": self.ino, "file_id": self.file_id.hex(),
            "offset": self.offset, "block": self.block.hex(),
        }).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "TruncateIntent":
        data = json.loads(raw)
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {data.get('version')!r}")
        return cls(int(data["dev"]), int(data["ino"]), bytes.fromhex(data["file_id"]),
                   int(data["offset"]), bytes.fromhex(data["block"]))


class TruncationJournal:
    """Intent records of the truncates in flight, in one store."""

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.directory = store_dir(backing) / INTENT_DIR

    @contextmanager
    def intent(self, fd: int, file_id: bytes, offset: int, block: bytes) -> Iterator[None]:
        """Keep a record of "cut ``fd`` at ``offset``, then write ``block`` there" while the body runs.

        If the body raises (a disk error between the cut and the write), the
        record stays: the kept bytes exist nowhere else.  The caller gets the
        error, and the next mount completes the truncate.
        """
        st = os.fstat(fd)
        record = TruncateIntent(st.st_dev, st.st_ino, file_id, offset, block)
        name = f"{st.st_dev:x}-{st.st_ino:x}"
        self.directory.mkdir(mode=0o700, exist_ok=True)
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        record_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(record_fd, fcntl.LOCK_EX)  # held until the truncate is done (or we die)
            data = record.to_json()
            if os.write(record_fd, data) != len(data):
                raise OSError("short write of a truncate intent record")
            os.rename(tmp, final)  # the record appears complete or not at all
            try:
                yield
            except BaseException:
                log.error("a truncate failed between cutting the file and writing its new last block; "
                          "the block is kept in %s and the next mount writes it", final)
                raise
            os.unlink(final)
        finally:
            os.close(record_fd)

    def pending(self) -> list[Path]:
        """Records whose owner is gone (a killed daemon); not those of live truncates."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith("."):
                continue
            path = self.directory / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # finished meanwhile
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live daemon's truncate in flight
                if os.fstat(fd).st_nlink:
                    found.append(path)
            finally:
                os.close(fd)
        return found

    def complete_pending(self) -> list[str]:
        """Finish every truncate a crash interrupted; returns what was done, for the log."""
        done = []
        for path in self.pending():
            done.append(self._complete(path))
        for name in _tmp_leftovers(self.directory):
            _remove_if_unlocked(self.directory / name)  # never renamed: its truncate never started
        return done

    def _complete(self, path: Path) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not os.fstat(fd).st_nlink:
                return f"{path.name}: finished by its owner"
            try:
                record = TruncateIntent.from_json(os.read(fd, 1 << 20))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("dropping unreadable truncate record %s: %s", path, exc)
                path.unlink()
                return f"{path.name}: unreadable record dropped"
            shown = self._apply(record)
            path.unlink()
            _fsync_dir(self.directory)
            return shown
        finally:
            os.close(fd)

    def _apply(self, record: TruncateIntent) -> str:
        for dir_fd, name, shown in iter_regular_files(self.backing):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (record.dev, record.ino):
                continue
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                try:
                    header = parse_header(os.getxattr(fd, HEADER_XATTR))
                except (OSError, FormatError):
                    continue
                if header.file_id != record.file_id:
                    continue  # the inode number was reused by another file
                size = os.fstat(fd).st_size
                if size < record.offset:
                    log.error("not completing the truncate of %s: it is %d bytes, shorter than the "
                              "record's cut at %d", shown, size, record.offset)
                    return f"{shown}: left alone (shorter than expected)"
                os.ftruncate(fd, record.offset)
                _pwrite_all(fd, record.block, record.offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning("completed the truncate of %s that a crash interrupted", shown)
            return f"{shown}: truncate completed"
        log.warning("a truncate interrupted by a crash names a file that no longer exists (inode %d)", record.ino)
        return f"inode {record.ino}: file gone, record dropped"


def _tmp_leftovers(directory: Path) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _remove_if_unlocked(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live daemon is writing it
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
