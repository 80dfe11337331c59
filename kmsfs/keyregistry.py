"""CMK metadata, kept in BACKING/.kmsfs.d/keys.json.

The HSM holds the key material; this file holds what a cloud KMS shows about a
key: its id, alias, description, state, owner, versions and schedule.  Field
names follow Tencent Cloud KMS's KeyMetadata.

The metadata is not trusted for security: a disabled key is also refused by
the HSM itself, so editing this file cannot undo a disable.  Updates take an
exclusive flock and replace the file atomically, so several mounts of one
store see the same keys.

An update that changes key attributes in the HSM hands its lock (the open
descriptor) and the new file to a detached helper (hsmchange.py), which
writes both and keeps the lock until it is done, even if this process is
killed.  Mount, fsck and ``kmsfs key`` therefore wait for the lock before
they look at the HSM (key_changes_settled).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .store import StoreError, atomic_write, store_dir

log = logging.getLogger(__name__)

KEYS_NAME = "keys.json"
LOCK_NAME = "keys.lock"
DEFAULT_ALIAS = "kmsfs-default"
OWNER_FILESYSTEM = "kmsfs"
ORIGIN_KMSFS = "KMSFS"
ORIGIN_EXTERNAL = "EXTERNAL"

ENABLED = "Enabled"
DISABLED = "Disabled"
PENDING_DELETE = "PendingDelete"
PENDING_IMPORT = "PendingImport"
KEY_STATES = (ENABLED, DISABLED, PENDING_DELETE, PENDING_IMPORT)

_ALIAS_RE = re.compile(r"[A-Za-z0-9_\-/.]{1,60}")  # with fullmatch: "$" would let a trailing "\n" through

T = TypeVar("T")

#: How stale another mount's key changes may be before this mount sees them.
REVALIDATE_SECONDS = 0.2
#: How long mount, fsck and ``kmsfs key`` wait for a key change in flight
#: (KMSFS_KEY_LOCK_WAIT overrides it).  A change takes well under a second.
KEY_LOCK_WAIT = 60.0


class KeyNotFound(StoreError):
    pass


def validate_alias(alias: str) -> str:
    if not _ALIAS_RE.fullmatch(alias) or alias.startswith(".") or "/" in alias:
        raise ValueError(
            "an alias is 1 to 60 characters of letters, digits, '_', '-' and '.', not starting with '.'"
        )
    return alias


@dataclass
class KeyRecord:
    KeyId: str
    Alias: str
    Description: str = ""
    KeyState: str = ENABLED
    Origin: str = ORIGIN_KMSFS
    Owner: str = OWNER_FILESYSTEM
    CreateTime: int = 0
    KeyRotationEnabled: bool = False
    RotateDays: int = 0
    LastRotateTime: int = 0
    NextRotateTime: int = 0
    DeletionDate: int = 0
    CurrentVersion: int = 1
    #: Versions that exist in the HSM (destroyed ones are removed).
    Versions: list[int] = field(default_factory=lambda: [1])
    #: uid/gid grants, e.g. {"uid:1000": "use"}; filled by the lifecycle layer.
    Grants: dict[str, str] = field(default_factory=dict)

    @property
    def key_uuid(self) -> uuid.UUID:
        return uuid.UUID(self.KeyId)

    @property
    def filesystem_managed(self) -> bool:
        return self.Owner == OWNER_FILESYSTEM

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KeyRecord":
        known = {f for f in cls.__dataclass_fields__}
        record = cls(**{k: v for k, v in data.items() if k in known})
        uuid.UUID(record.KeyId)
        if record.KeyState not in KEY_STATES:
            raise ValueError(f"unknown key state {record.KeyState!r}")
        return record


@dataclass
class Registry:
    keys: dict[str, KeyRecord] = field(default_factory=dict)  # by KeyId
    default_key: str = ""
    #: KeyIds whose material was destroyed after scheduled deletion.
    destroyed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "default_key": self.default_key,
            "keys": [asdict(k) for k in sorted(self.keys.values(), key=lambda k: k.CreateTime)],
            "destroyed": list(self.destroyed),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Registry":
        keys = {}
        for item in data.get("keys", []):
            record = KeyRecord.from_json(item)
            keys[record.KeyId] = record
        destroyed = [str(k) for k in data.get("destroyed", [])]
        return cls(keys=keys, default_key=str(data.get("default_key", "")), destroyed=destroyed)

    def resolve(self, ref: str) -> KeyRecord:
        """A key by KeyId or alias."""
        ref = ref.strip()
        record = self.keys.get(ref)
        if record is not None:
            return record
        try:
            record = self.keys.get(str(uuid.UUID(ref)))
        except ValueError:
            record = None
        if record is not None:
            return record
        for candidate in self.keys.values():
            if candidate.Alias == ref:
                return candidate
        raise KeyNotFound(f"no CMK with id or alias {ref!r}")

    def by_uuid(self, key_id: uuid.UUID) -> KeyRecord:
        record = self.keys.get(str(key_id))
        if record is None:
            if str(key_id) in self.destroyed:
                raise KeyNotFound(f"CMK {key_id} was deleted and its material destroyed; the data is unrecoverable")
            raise KeyNotFound(f"CMK {key_id} is not known to this store")
        return record

    def default(self) -> KeyRecord:
        return self.resolve(self.default_key)


class KeyRegistry:
    """Cached, lock-protected access to keys.json."""

    def __init__(self, backing: Path) -> None:
        self._path = store_dir(backing) / KEYS_NAME
        self._lock_path = store_dir(backing) / LOCK_NAME
        self._cached: Registry | None = None
        self._cached_stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._mutex = threading.Lock()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> Registry:
        try:
            data = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return Registry()
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are no text at all
            raise StoreError(f"{self._path} is damaged: {exc}") from exc
        try:
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, found {type(data).__name__}")
            return Registry.from_json(data)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise StoreError(f"{self._path} is damaged: {exc}") from exc

    def snapshot(self) -> Registry:
        """The current registry; re-read only when the file changed (another mount)."""
        with self._mutex:
            return self._revalidate(time.monotonic())

    def recent(self) -> Registry:
        """The registry as of at most REVALIDATE_SECONDS ago (see record_for_use).

        Changes made through this object are seen at once; changes by another
        mount within REVALIDATE_SECONDS.  It saves a stat() of keys.json.
        """
        now = time.monotonic()
        # Asked on every open, read and write: a fresh view is returned without
        # the mutex.  _revalidate and update assign _cached before _checked, so
        # a reader racing them gets the view they replace, at most a moment old.
        cached = self._cached
        if cached is not None and now - self._checked < REVALIDATE_SECONDS:
            return cached
        with self._mutex:
            if self._cached is not None and now - self._checked < REVALIDATE_SECONDS:
                return self._cached
            return self._revalidate(now)

    def record_for_use(self, key_id: str) -> KeyRecord | None:
        """``key_id``'s record for a request (open, read, write) to check its state.

        An Enabled key is taken from recent(), which saves a stat() of
        keys.json per request: a disable by another mount counts within
        REVALIDATE_SECONDS.  A key missing there (it may be new) or not
        Enabled there (it may have been enabled again) is looked up in
        snapshot(), so that nothing is refused on a stale view.  None: no
        such key.
        """
        record = self.recent().keys.get(key_id)
        if record is not None and record.KeyState == ENABLED:
            return record
        return self.snapshot().keys.get(key_id)

    def _revalidate(self, now: float) -> Registry:
        stamp = self._stamp()
        if self._cached is None or stamp != self._cached_stamp:
            self._cached = self._read()
            self._cached_stamp = stamp
        self._checked = now
        return self._cached

    @contextmanager
    def _flock(self) -> Iterator[int]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def update(self, change: Callable[[Registry], T],
               commit: Callable[[Path, bytes, int], None] | None = None) -> T:
        """Apply ``change`` to a fresh copy under an exclusive lock and save it atomically.

        If ``change`` raises, nothing is written.  ``commit(path, data, lock_fd)``,
        if given, writes the file instead (with the HSM changes that go with it).
        """
        with self._mutex, self._flock() as lock_fd:
            registry = self._read()
            result = change(registry)
            data = (json.dumps(registry.to_json(), indent=2) + "\n").encode()
            if commit is None:
                atomic_write(self._path, data)
            else:
                commit(self._path, data, lock_fd)
            self._cached = registry
            self._cached_stamp = self._stamp()
            self._checked = time.monotonic()
            return result


@contextmanager
def key_changes_settled(backing: Path, timeout: float | None = None) -> Iterator[None]:
    """Wait until no key change is in flight on this store, and keep new ones out meanwhile.

    A key change holds keys.lock exclusively, in its helper process even after
    the process that started it was killed (see hsmchange.py).  This takes
    the lock shared, waiting up to ``timeout`` seconds, so that the HSM and
    keys.json are seen together and never in the middle of a change.  Raises
    StoreError when the wait runs out.
    """
    if timeout is None:
        timeout = float(os.environ.get("KMSFS_KEY_LOCK_WAIT") or KEY_LOCK_WAIT)
    lock_path = store_dir(backing) / LOCK_NAME
    try:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)  # someone else's store, read-only
    except FileNotFoundError:
        # Not a store (the caller says so), or no key change was ever made here.
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"a key change on this store is still in progress after {timeout:.0f}s "
                        f"({lock_path} is locked); try again, or see which process holds it: "
                        f"fuser -v {lock_path}") from None
                if not waited:
                    log.warning("waiting for a key change in progress on this store to finish (%s is locked)",
                                lock_path)
                    waited = True
                time.sleep(0.05)
        if waited:
            log.info("the key change in progress has finished")
        yield
    finally:
        os.close(fd)


def new_key_record(alias: str, owner: str, origin: str = ORIGIN_KMSFS, description: str = "") -> KeyRecord:
    now = int(time.time())
    state = PENDING_IMPORT if origin == ORIGIN_EXTERNAL else ENABLED
    versions = [] if origin == ORIGIN_EXTERNAL else [1]
    return KeyRecord(
        KeyId=str(uuid.uuid4()), Alias=validate_alias(alias), Description=description,
        KeyState=state, Origin=origin, Owner=owner, CreateTime=now,
        CurrentVersion=1 if versions else 0, Versions=versions,
    )
