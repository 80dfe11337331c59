"""The backing store: kmsfs's own small files inside BACKING.

Layout::

    BACKING/.kmsfs.d/config.json   format version, store id, block size, HSM URI
    BACKING/.kmsfs.d/keys.json     CMK metadata (see keyregistry.py)

``.kmsfs.d`` is hidden from the plaintext view.  No PIN and no key material is
ever written here.  Every update replaces the whole file atomically
(write to a temporary file, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .format import (
    DEFAULT_DISK_BLOCK_SIZE, FORMAT_VERSION, SUPPORTED_VERSIONS, FormatError, block_size_log2,
    plaintext_block_for_disk_block,
)
from .pkcs11uri import Pkcs11Uri

log = logging.getLogger(__name__)

STORE_DIR_NAME = ".kmsfs.d"
CONFIG_NAME = "config.json"
#: Names at the root of the plaintext view that kmsfs reserves for itself.
RESERVED_ROOT_NAMES = frozenset({STORE_DIR_NAME.encode(), b".kmsfs"})
#: An xattr written once by init and mount to prove user xattrs work.
PROBE_XATTR = "user.kmsfs.probe"


class StoreError(Exception):
    """BACKING is not a usable kmsfs store; the message says why and what to do."""

    errno = errno.EIO


def store_dir(backing: Path) -> Path:
    return backing / STORE_DIR_NAME


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_user_xattrs(directory: Path) -> None:
    """Refuse a backing filesystem without user xattrs: every DEK lives in one."""
    fd, probe = tempfile.mkstemp(prefix=".kmsfs-xattr-probe.", dir=directory)
    try:
        os.setxattr(fd, PROBE_XATTR, b"1")
        if os.getxattr(fd, PROBE_XATTR) != b"1":
            raise OSError(errno.EIO, "xattr read back differs")
    except OSError as exc:
        raise StoreError(
            f"the filesystem of {directory} does not support user extended attributes "
            f"({os.strerror(exc.errno or 0)}); kmsfs keeps each file's wrapped key in the "
            f"xattr user.kmsfs. Use ext4, XFS, btrfs or tmpfs, or mount with user_xattr."
        ) from exc
    finally:
        os.close(fd)
        os.unlink(probe)


#: Changes made by ctime_moves_after_stat, and the longest they may take: a
#: slower run could give each change a new clock tick by chance, and is tried
#: again, up to CTIME_PROBE_ATTEMPTS times (a busy host may preempt one).
CTIME_PROBE_CHANGES = 8
CTIME_PROBE_SECONDS = 0.001
CTIME_PROBE_ATTEMPTS = 3


def ctime_moves_after_stat(directory: Path) -> bool:
    """Whether a change made right after a ``stat`` always gives a file a new ctime.

    Timestamps of clock-tick granularity (1 to 10 ms) give every change within
    one tick the same ctime; Linux 6.13 and later hand out a finer one to the
    first change after a stat ("multigrain" timestamps, on ext4, XFS, btrfs and
    tmpfs).  The daemon trusts a remembered header only while the file's stamp
    is unchanged (kmsfs/headermemo.py), which needs the latter.  Tested here as
    it is used: stat, change an xattr, stat, several times within a fraction of
    a tick, so that a clock of ticks would give two changes the same ctime.
    False if any two did, if no run was quick enough to tell, or on any error.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".kmsfs-ctime-probe.", dir=directory)
    except OSError:
        return False
    try:
        for attempt in range(CTIME_PROBE_ATTEMPTS):
            start = time.monotonic()
            seen = [os.fstat(fd).st_ctime_ns]
            for turn in range(CTIME_PROBE_CHANGES):
                os.setxattr(fd, PROBE_XATTR, f"{attempt}.{turn}".encode())
                seen.append(os.fstat(fd).st_ctime_ns)
            if not all(before < after for before, after in zip(seen, seen[1:])):
                return False
            if time.monotonic() - start < CTIME_PROBE_SECONDS:
                return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


@dataclass
class StoreConfig:
    store_id: str
    block_size: int
    hsm_uri: str
    hsm_env: dict[str, str] = field(default_factory=dict)
    embedded_hsm: bool = False
    format_version: int = FORMAT_VERSION

    def uri(self) -> Pkcs11Uri:
        return Pkcs11Uri.parse(self.hsm_uri)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format_version,
            "store_id": self.store_id,
            "block_size": self.block_size,
            "hsm": {"uri": self.hsm_uri, "env": self.hsm_env, "embedded": self.embedded_hsm},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> "StoreConfig":
        try:
            version = int(data["format"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where} has no valid format version") from exc
        if version not in SUPPORTED_VERSIONS:
            raise StoreError(
                f"{where} is a kmsfs store of format version {version}; this kmsfs reads "
                f"version {', '.join(map(str, sorted(SUPPORTED_VERSIONS)))}. "
                f"Use the kmsfs release that created it."
            )
        try:
            hsm = data["hsm"]
            config = cls(
                store_id=str(data["store_id"]),
                block_size=int(data["block_size"]),
                hsm_uri=str(hsm["uri"]),
                hsm_env={str(k): str(v) for k, v in dict(hsm.get("env") or {}).items()},
                embedded_hsm=bool(hsm.get("embedded", False)),
                format_version=version,
            )
            block_size_log2(config.block_size, version)
        except (KeyError, TypeError, ValueError, FormatError) as exc:
            raise StoreError(f"{where} is damaged: {exc}") from exc
        return config


def new_store_id() -> str:
    return secrets.token_hex(16)


def load_config(backing: Path) -> StoreConfig:
    path = store_dir(backing) / CONFIG_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(
            f"{backing} is not a kmsfs store (no {STORE_DIR_NAME}/{CONFIG_NAME}); "
            f"create one with: kmsfs init {backing}"
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {os.strerror(exc.errno or 0)}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path} is damaged (not JSON: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise StoreError(f"{path} is damaged (not a JSON object)")
    return StoreConfig.from_json(data, path)


def is_store(backing: Path) -> bool:
    return (store_dir(backing) / CONFIG_NAME).exists()


def save_config(backing: Path, config: StoreConfig) -> None:
    atomic_write(store_dir(backing) / CONFIG_NAME, (json.dumps(config.to_json(), indent=2) + "\n").encode())


def validate_block_size(disk_block_size: int | None) -> int:
    """The plaintext block size of a new store from ``init --block-size`` (the on-disk size)."""
    size = DEFAULT_DISK_BLOCK_SIZE if disk_block_size is None else disk_block_size
    return plaintext_block_for_disk_block(size, FORMAT_VERSION)
