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
from pathlib import Path

from .envelope import Envelope, HeaderError, KeyUnusable
from .format import HEADER_XATTR
from .keyregistry import KeyNotFound, KeyRecord
from .keystore import HsmError
from .kms import RewrapProgress
from .treewalk import iter_regular_files

log = logging.getLogger(__name__)


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
    except (KeyUnusable, KeyNotFound) as exc:
        # The key was disabled or deleted meanwhile (through a mount or the CLI):
        # an expected end, not a bug.  The files done so far stay done.
        progress.state = "failed"
        progress.error = str(exc)
        log.error("rewrap of key %s stopped: %s", key.KeyId, exc)
    except Exception as exc:
        progress.state = "failed"
        progress.error = str(exc)
        log.exception("rewrap of key %s stopped", key.KeyId)
    finally:
        progress.finished = int(time.time())
    log.info("rewrap of key %s: %d rewrapped, %d already current, %d failed",
             key.KeyId, progress.done, progress.skipped, progress.failed)


