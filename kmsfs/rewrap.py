"""Rewrap: move every file under a CMK onto the key's newest version.

Only headers change: each file keeps its DEK and its content, and its
``user.kmsfs`` xattr is replaced with one setxattr, which the backing
filesystem applies atomically.  A rewrap interrupted at any point (even by
kill -9) leaves every file readable, and running it again finishes the job,
since files already on the newest version are skipped.

The walk goes directory by directory with file descriptors, so it works for
trees deeper than PATH_MAX.  It is blocking and runs in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .envelope import Envelope, HeaderError
from .keyregistry import KeyRecord
from .keystore import HsmError
from .kms import RewrapProgress
from .store import STORE_DIR_NAME

log = logging.getLogger(__name__)

HEADER_XATTR = "user.kmsfs"


def iter_regular_files(backing: Path) -> Iterator[tuple[int, str, str]]:
    """(directory fd, name, display path) of every regular file below ``backing``."""
    root_fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, str]] = [(root_fd, "")]
    try:
        while stack:
            dir_fd, prefix = stack.pop()
            try:
                with os.scandir(dir_fd) as entries:
                    items = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                             for e in entries]
                for name, is_dir, is_file in items:
                    if not prefix and name == STORE_DIR_NAME:
                        continue
                    if is_dir:
                        try:
                            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                            dir_fd=dir_fd)
                        except OSError as exc:
                            log.warning("rewrap: cannot enter %s%s: %s", prefix, name, exc)
                            continue
                        stack.append((child, f"{prefix}{name}/"))
                    elif is_file:
                        yield dir_fd, name, prefix + name
            finally:
                if dir_fd != root_fd:
                    os.close(dir_fd)
    finally:
        os.close(root_fd)
        for fd, _ in stack:
            os.close(fd)


def rewrap_key(backing: Path, envelope: Envelope, key: KeyRecord, progress: RewrapProgress) -> None:
    """Rewrap every file whose header names ``key`` at an older version."""
    key_bytes = key.key_uuid.bytes
    progress.state = "running"
    progress.started = int(time.time())
    progress.total = progress.done = progress.skipped = progress.failed = 0
    progress.error = ""
    try:
        for dir_fd, name, shown in iter_regular_files(backing):
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError:
                continue  # removed meanwhile
            try:
                proc = f"/proc/self/fd/{fd}"
                try:
                    raw = os.getxattr(proc, HEADER_XATTR)
                except OSError as exc:
                    if exc.errno == errno.ENODATA:
                        continue
                    raise
                header = envelope.parse(raw)
                if header.key_id != key_bytes:
                    continue
                progress.total += 1
                if header.key_version == key.CurrentVersion:
                    progress.skipped += 1
                    continue
                new_header = envelope.rewrap(header, key)
                os.setxattr(proc, HEADER_XATTR, new_header.to_bytes())
                progress.done += 1
            except (HeaderError, HsmError, OSError) as exc:
                progress.failed += 1
                log.error("rewrap of %s failed: %s", shown, exc)
            finally:
                os.close(fd)
        progress.state = "done" if progress.failed == 0 else "failed"
    except Exception as exc:
        progress.state = "failed"
        progress.error = str(exc)
        log.exception("rewrap of key %s stopped", key.KeyId)
    finally:
        progress.finished = int(time.time())
    log.info("rewrap of key %s: %d rewrapped, %d already current, %d failed",
             key.KeyId, progress.done, progress.skipped, progress.failed)


__all__ = ["rewrap_key", "iter_regular_files"]
