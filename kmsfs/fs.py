"""The FUSE frontend: pyfuse3 operations over the encrypted backing tree.

Design, after libfuse's passthrough_ll: every inode the kernel knows is held
open as an ``O_PATH`` file descriptor on the backing file, so operations work
relative to descriptors, never to long path strings, survive renames, and
keep working on open-unlinked files.  FUSE inode numbers are the backing
inode numbers (the backing root is mapped to FUSE's root), so ``st_ino`` is
stable across mounts.

Only this module (and mount.py, which starts it) imports pyfuse3.  Every
operation goes through ``_fuse_op``, the one place where exceptions become
``FUSEError(errno)`` and are logged once with their cause.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import fuseloop
from .cipherfile import CipherFile, WouldBlock
from .clientspin import ClientSpinner
from .fuseinit import Negotiated
from .truncation import TruncationJournal
from .controldir import CONTROL_BASE, CONTROL_NAME, ControlDir, ControlHandle
from .contentcrypt import BlockAuthError, ContentCipher
from .envelope import Envelope, HeaderError, KeyUnusable, key_name
from .format import (
    HEADER_XATTR, FormatError, Header, canonical_context, disk_block_size, parse_context, plaintext_size_lenient,
)
from .keyregistry import KeyNotFound, KeyRecord, KeyRegistry
from .keystore import HsmError
from .decrypthelper import DecryptHelper
from .dirtyroom import DirtyRoom
from .headermemo import HeaderMemo
from .prefetch import Prefetcher, start_reading
from .kms import Caller, KeyService, KmsError, RewrapProgress
from .rewrap import rewrap_key
from .store import PROBE_XATTR, RESERVED_ROOT_NAMES, StoreError

log = logging.getLogger(__name__)

KEY_XATTR = "user.kmsfs.key"
CONTEXT_XATTR = "user.kmsfs.context"
_RESERVED_XATTR_PREFIX = "user.kmsfs"
#: The only xattr namespace a mount has (see _supported_xattr).
_USER_XATTR_PREFIX = b"user."

#: How long the kernel may cache names and attributes.  Everything that
#: changes the tree goes through this daemon, which keeps the kernel informed;
#: changes made behind its back in the backing store show after this long.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
#: Reads and writes up to this size are served on the trio loop itself.  Measured
#: here (scripts/bench, fio 4k randrw): a worker-thread round trip costs more than
#: a pread/pwrite from the page cache plus the crypto of 16 blocks (~20-40 us),
#: so small requests run inline; large ones (1 MiB writes) go to threads.
#: Larger reads (1 MiB readahead requests) are also decrypted on the loop when
#: all their blocks are in the page cache (preadv2 RWF_NOWAIT); only a read
#: that would wait for the disk goes to a worker thread.  The thread round
#: trip, and the GIL changing hands between the loop and a worker at every
#: 4 KiB block, cost more than the decryption: 512 MiB sequential reads with
#: the backing file cached, 4 interleaved rounds, 577-678 -> 1004-1156 MB/s
#: (with the allocator tuning in mount.py; without it the loop thread's
#: 1 MiB buffers are page-faulted in anew on every request).  The loop is
#: busy for about half a millisecond per 1 MiB request meanwhile.
INLINE_MAX = 64 * 1024
#: HSM calls run inline while their moving-average latency stays below this.
#: In the daemon a SoftHSM2 wrap or unwrap takes 160-300 us (its code and token
#: files are cold by the next call), and a worker-thread round trip 60-300 us
#: on these VMs, and the worker's return contends for the GIL with the system
#: call that follows.  With 0.2 ms as the bound, SoftHSM2 hovered around it
#: and a third of the calls went to threads.  tar xf of the bench tree, daemon
#: instrumented, back to back: create requests 1.7 -> 0.8 ms, the whole
#: extract 7.4-9.1 s -> 5.2-5.7 s.  A network HSM, at milliseconds a call,
#: still goes to threads.
HSM_INLINE_MAX = 0.001
#: Opening a file that readdir listed warms this many files listed after it at
#: first (see _prefetch_after).
PREFETCH_FILES = 16
#: The window doubles with each refill while a listing is read in order, up to this.
PREFETCH_FILES_MAX = 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class IntegrityError(Exception):
    """Tampering or damage detected while serving a file; the caller gets EIO."""

    errno = errno.EIO


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) else None


def _uncounted(fn: F) -> F:
    """Leave an operation out of _fuse_op's count of requests that a client waits on.

    Nobody waits for FORGET (it has no reply) or RELEASE (the kernel sends it
    after close(2) has returned).  READ and WRITE count themselves, small
    requests only: a sequential reader or writer of 1 MiB requests keeps both
    CPUs busy without help.  OPEN holds the count off instead
    (ClientSpinner.note_open).
    """
    fn._counted = False  # type: ignore[attr-defined]
    return fn


def _fuse_op(fn: F) -> F:
    """Turn every exception of an operation into one FUSEError, logged once.

    And keep the sender's CPU awake while it waits for the answer
    (kmsfs/clientspin.py): one store in a shared page.  Every kind of request
    counts, since a program walking a tree (``ls -lR``, ``tar``, ``find``)
    waits on LOOKUP, GETATTR, GETXATTR and READDIR as much as on READ (but
    see ClientSpinner.note_open for OPEN).
    What it gave is in docs/operations.md: the most under steal, where a cold
    ``ls -lR`` took 0.25-0.50 s instead of 0.32-1.74 s.
    """
    counted: bool = getattr(fn, "_counted", True)

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        if counted:
            spinner = args[0].client_spinner
            if spinner is not None:
                spinner.note_request()
        try:
            return await fn(*args)
        except FUSEError:
            raise
        except OSError as exc:
            # Ordinary results such as ENOENT from lookup are not worth a log line.
            log.debug("%s: %s", fn.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except (HsmError, KeyUnusable, HeaderError, StoreError, IntegrityError, KeyNotFound, KmsError) as exc:
            code = _errno_of(exc) or errno.EIO
            log.error("%s failed: %s", fn.__name__, exc)
            raise FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s; answering EIO", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class NodeLock:
    """Per-inode lock: exclusive for changes, shared for reads.

    ``async with lock`` takes it exclusively; ``async with lock.shared()`` lets
    reads of one file run side by side (the kernel sends several readahead
    requests at once, and each is a pread plus decryption in its own worker
    thread), while a change waits until the reads in progress are done and
    reads arriving after it wait for the change: a read never sees a block
    half written.

    An uncontended acquire does not yield to the scheduler: ``async with
    trio.Lock()`` always does (a checkpoint), which costs about 9 us of CPU per
    request here, more than many handlers' own work.  Nor does it use
    trio.Lock's acquire_nowait and release, which track the owning task for
    error checks: in the daemon, with its caches cold between requests,
    taking and releasing the lock that way was 8 to 10% of an open's time
    (py-spy, cold ``tar cf``).  Every
    inode the kernel has looked up has one of these, so the parking lot is
    made on first contention only.  Contended acquires wait in FIFO order:
    a release hands the lock to the first waiter.
    """

    __slots__ = ("_held", "_waiters", "_readers", "_drained")

    def __init__(self) -> None:
        self._held = False
        self._waiters: trio.lowlevel.ParkingLot | None = None
        self._readers = 0
        self._drained: trio.Event | None = None

    async def _take(self) -> None:
        """The exclusive hold.  While anyone waits, the lock is held: see _give."""
        if not self._held:
            self._held = True
            return
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = trio.lowlevel.ParkingLot()
        # Cancelled while parked: the task leaves the lot and the lock is not
        # ours.  Unparked: _give has made it ours, and nothing can cancel that.
        await waiters.park()

    def _give(self) -> None:
        waiters = self._waiters
        if waiters:
            waiters.unpark()  # handed over: _held stays True
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self._take()
        try:
            while self._readers:
                if self._drained is None:
                    self._drained = trio.Event()
                await self._drained.wait()
        except BaseException:
            self._give()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._give()

    def shared(self) -> "_SharedHold":
        return _SharedHold(self)

    def locked(self) -> bool:
        return self._held or self._readers > 0


class _SharedHold:
    __slots__ = ("_node_lock",)

    def __init__(self, node_lock: NodeLock) -> None:
        self._node_lock = node_lock

    async def __aenter__(self) -> None:
        lock = self._node_lock
        # Through the exclusive hold, so that a waiting change goes first.
        await lock._take()
        lock._readers += 1
        lock._give()

    async def __aexit__(self, *exc_info: object) -> None:
        lock = self._node_lock
        lock._readers -= 1
        if lock._readers == 0 and lock._drained is not None:
            lock._drained.set()
            lock._drained = None


@dataclass(eq=False)
class OpenFile:
    """The shared state of a regular file while at least one handle is open."""

    fd: int
    header: Header | None  # None: an empty file that has no header yet
    cipher_file: CipherFile | None
    handles: int = 0

    @property
    def key_id(self) -> str | None:
        header = self.header
        # Asked on every open, read and write: key_name keeps the few UUIDs' text.
        return None if header is None else key_name(header.key_id)


@dataclass(eq=False)
class Inode:
    ino: int
    fd: int  # O_PATH descriptor of the backing inode
    mode: int
    nlookup: int = 0
    lock: NodeLock = field(default_factory=NodeLock)
    open_file: OpenFile | None = None
    #: The backing file's (mtime, ctime, size) when the kernel last got its
    #: content from us.  If it still matches at the next open, the kernel may
    #: keep its cached plaintext; any change behind our back drops it.
    cache_stamp: tuple[int, int, int] | None = None
    #: The CMK of the file when last opened, to drop its cache on a disable.
    key_id: str | None = None
    #: Where readdir last listed this regular file: (listing, index in it).
    listed: tuple["Listing", int] | None = None


@dataclass(eq=False)
class Listing:
    """One readdir pass over a directory, for prefetching the files after an opened one."""

    dir_ino: int
    names: list[bytes]
    prefetched_to: int = 0
    #: Files the next prefetch covers (grows while the listing is read in order).
    window: int = PREFETCH_FILES


@dataclass(eq=False)
class FileHandle:
    inode: Inode
    flags: int
    #: Served with direct_io: opened write-only (see KmsfsOperations._serves_direct).
    direct: bool = False
    #: (uid, gid, pid) of an opener whose writes must drop the file's set-user-ID
    #: and set-group-ID bits (see _drop_set_id_bits); None: none to drop.
    drops_set_id: tuple[int, int, int] | None = None


@dataclass(eq=False)
class DirHandle:
    inode: Inode
    fd: int
    names: list[bytes] | None = None
    listing: Listing | None = None


@dataclass(eq=False)
class ControlDirHandle:
    ino: int


class KmsfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    # Off by default; `-o writeback_cache` turns it on for one mount (mount.py).
    # With it the kernel keeps written pages and sends them in large batches, so
    # small writes cost no request each (scripts/bench: fio 4k randrw ~2.5x), and
    # the kernel places O_APPEND writes and keeps size and mtime itself.  But it
    # then never takes a cached file's size from us again, so changes made
    # behind the mount's back (another mount of the store) are not seen.
    enable_writeback_cache = False

    def __init__(self, backing: Path, envelope: Envelope, registry: KeyRegistry, block_size: int,
                 kms: KeyService, status: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.backing = backing
        self.envelope = envelope
        self.registry = registry
        self.block_size = block_size
        # st_blksize: the power of two that names the geometry (a page for format 2).
        self.io_block_size = disk_block_size(block_size, envelope.format_version)
        self.truncations = TruncationJournal(backing)
        self.kms = kms
        self.control = ControlDir(kms, status, self._start_rewrap, self._invalidate_key)
        #: Set by the main loop: where background jobs (rewrap) run.
        self.nursery: trio.Nursery | None = None
        #: Descriptors of forgotten inodes that a worker is about to close (see _close_forgotten).
        self._closing: list[int] = []
        self._closer_running = False
        root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self._root_dev_ino = (st.st_dev, st.st_ino)
        root = Inode(pyfuse3.ROOT_INODE, root_fd, st.st_mode, nlookup=1)
        self.inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: root}
        self._handles: dict[int, FileHandle | DirHandle | ControlHandle | ControlDirHandle] = {}
        self._next_fh = 1
        self._foreign_ino = 1 << 62
        self._foreign: dict[tuple[int, int], int] = {}
        self._as_root = os.geteuid() == 0
        #: Write requests answered, by how their handle was served (.kmsfs/status).
        self.write_requests = {"direct": 0, "cached": 0, "on_loop": 0}
        #: Large writes are made on the loop while this allows (``-o write_on_loop=0``: None).
        self.dirty_room: DirtyRoom | None = None
        #: The FUSE flags kmsfs/fuseinit.py answered INIT with; None: libfuse's own.
        self.init_flags: Negotiated | None = None
        #: directory inode -> (user.kmsfs.key, canonical context, when looked up)
        self._dir_policy: dict[int, tuple[str | None, bytes, float]] = {}
        #: Recent HSM call latency (seconds, moving average): decides inline or thread.
        self._hsm_latency = 0.0
        #: The helper process that warms the backing cache (see _prefetch_after);
        #: None: no prefetching.  Set and closed by the mount.
        self.prefetcher: Prefetcher | None = None
        #: The helper that keeps a waiting client's CPU awake (kmsfs/clientspin.py);
        #: None: none.  Set and closed by the mount.
        self.client_spinner: ClientSpinner | None = None
        #: The helper that decrypts part of each large cached read on the other
        #: CPU (kmsfs/decrypthelper.py); None: the loop decrypts alone.  Set and
        #: closed by the mount, before any file is opened.
        self.decrypt_helper: DecryptHelper | None = None
        #: Whether large reads of files outside the page cache may go around it
        #: with our own readahead (kmsfs/directstream.py); ``-o direct_read=0``.
        self.direct_reads = True
        #: Headers as last read, for files unchanged since (kmsfs/headermemo.py);
        #: None where the backing filesystem's ctimes cannot vouch for that.
        self.header_memo: HeaderMemo | None = None
        #: The one device the memo is for: the store's own, where ctimes were checked.
        self.header_memo_dev = -1

    # ================================================================ inode table

    def _ino_of(self, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        if key == self._root_dev_ino:
            return pyfuse3.ROOT_INODE
        if st.st_dev == self._root_dev_ino[0] and st.st_ino != pyfuse3.ROOT_INODE:
            return st.st_ino
        # Another filesystem mounted inside the backing tree: numbers of our own.
        ino = self._foreign.get(key)
        if ino is None:
            self._foreign_ino += 1
            ino = self._foreign[key] = self._foreign_ino
        return ino

    def _inode(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            log.error("kernel used unknown inode %d", ino)
            raise FUSEError(errno.ESTALE) from None

    def _remember(self, parent_fd: int, name: bytes) -> tuple[Inode, os.stat_result]:
        """Look ``name`` up in the backing tree and count one kernel reference."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        ino = self._ino_of(st)
        inode = self.inodes.get(ino)
        if inode is None:
            inode = self.inodes[ino] = Inode(ino, fd, st.st_mode)
        else:
            os.close(fd)
        inode.nlookup += 1
        return inode, st

    def _forget_one(self, inode: Inode, count: int) -> None:
        inode.nlookup -= count
        if inode.nlookup <= 0 and inode.open_file is None and inode.ino != pyfuse3.ROOT_INODE:
            del self.inodes[inode.ino]
            if self.nursery is not None:
                self._closing.append(inode.fd)
                if not self._closer_running:
                    self._closer_running = True
                    self.nursery.start_soon(self._close_forgotten)
            else:
                os.close(inode.fd)

    async def _close_forgotten(self) -> None:
        """Close the descriptors of forgotten inodes in a worker thread, in batches.

        The kernel forgets an unlinked file after the unlink, and closing our
        O_PATH descriptor, the file's last reference, is when ext4 frees it:
        its blocks and the xattr block that holds the header.  That took about
        250 us per file on the loop, in the middle of rm -rf's unlinks.  A
        worker does it beside the loop instead, for every inode dropped from
        the table once the loop runs.  Nothing else refers to these
        descriptors any more.
        """
        batch: list[int] = []
        try:
            while self._closing:
                batch, self._closing = self._closing, []
                # Cancellable only before the thread starts; once started, trio
                # waits for it and returns normally, and batch is cleared below.
                await trio.to_thread.run_sync(_close_all, batch)
                batch = []
        finally:
            self._closer_running = False
            rest, self._closing = batch + self._closing, []
            if rest:  # the mount is ending: close the rest here
                _close_all(rest)

    def _attrs(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        entry.entry_timeout = ENTRY_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        if stat.S_ISREG(st.st_mode):
            entry.st_size = plaintext_size_lenient(st.st_size, self.block_size)
        else:
            entry.st_size = st.st_size
        entry.st_blksize = self.io_block_size
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _check_name(self, parent: int, name: bytes) -> None:
        if parent >= CONTROL_BASE or (parent == pyfuse3.ROOT_INODE and name in RESERVED_ROOT_NAMES):
            raise FUSEError(errno.EPERM)

    def _path_for_log(self, inode: Inode) -> str:
        try:
            return os.readlink(_proc(inode.fd))
        except OSError:
            return f"inode {inode.ino}"

    async def _new_entry(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        inode, st = self._remember(parent.fd, name)
        return self._attrs(inode, st)

    def _chown_new(self, parent: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """As root, give a new entry to the user who created it (as ext4 would)."""
        if not self._as_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        parent_st = os.fstat(parent.fd)
        gid = -1 if parent_st.st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=False)

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        if ctx.uid in (0, self.kms.admin_uid):
            return Caller(ctx.uid, ctx.gid)
        try:
            groups = frozenset(pyfuse3.get_sup_groups(ctx.pid))
        except (OSError, ValueError):
            groups = frozenset()
        return Caller(ctx.uid, ctx.gid, groups)

    def _new_fh(self, handle: FileHandle | DirHandle | ControlHandle | ControlDirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _require_usable(self, node: Inode, open_file: OpenFile) -> None:
        """EACCES once the file's CMK is no longer Enabled, even for open files."""
        key_id = open_file.key_id
        if key_id is None:
            return
        record = self.registry.record_for_use(key_id)
        if record is None:
            raise KeyUnusable(f"{self._path_for_log(node)}: CMK {key_id} no longer exists")
        if record.KeyState != "Enabled":
            raise KeyUnusable(f"{self._path_for_log(node)}: CMK {record.Alias} is {record.KeyState}")

    def _require_grant(self, ctx: pyfuse3.RequestContext, record: KeyRecord, operation: str) -> None:
        if ctx.uid in (0, self.kms.admin_uid):
            return
        self.kms.require(self._caller(ctx), record, "use", operation)

    async def _invalidate_key(self, key_id: str) -> None:
        """Drop the kernel's cached plaintext of every open file under ``key_id``,
        and the daemon's cached DEKs of files under it."""
        self.envelope.forget_key(uuid.UUID(key_id).bytes)
        for inode in list(self.inodes.values()):
            if inode.key_id == key_id:
                inode.cache_stamp = None
                # From a worker thread: the kernel may wait for page locks that
                # only this loop can release by answering pending reads.
                try:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode.ino, False)
                except OSError as exc:
                    # ENOENT: the kernel has no such inode (forgotten, or a create
                    # not yet answered), so it caches nothing of it either.
                    if exc.errno != errno.ENOENT:
                        raise

    async def watch_key_states(self, interval: float) -> None:
        """Drop cached plaintext of files whose key was disabled elsewhere.

        A disable through this mount drops the cache at once; one made through
        another mount of the same store, or the CLI on the store, reaches this
        mount through keys.json, which is polled here every ``interval`` seconds.
        """
        last: dict[str, str] = {}
        failing = ""
        first = True
        while True:
            if not first:
                await trio.sleep(interval)
            # This task runs beside the FUSE loop: an exception escaping it would
            # end the whole mount, so every failure is logged and retried instead.
            try:
                current = {key_id: record.KeyState for key_id, record in self.registry.snapshot().keys.items()}
                if not first:
                    # A key first seen already disabled may have been created and disabled
                    # between two polls, with files of ours opened under it meanwhile.
                    for key_id in last.keys() | current.keys():
                        if last.get(key_id, "Enabled") == "Enabled" and current.get(key_id) != "Enabled":
                            log.info("CMK %s is now %s: dropping cached plaintext", key_id,
                                     current.get(key_id, "gone"))
                            await self._invalidate_key(key_id)
                last = current
                first = False
                if failing:
                    log.info("watching key states works again")
                    failing = ""
            except Exception as exc:
                if str(exc) != failing:  # once per distinct failure, not every poll
                    log.error("watching key states failed (retrying every %.1fs): %s", interval, exc,
                              exc_info=not isinstance(exc, (StoreError, OSError)))
                    failing = str(exc) or type(exc).__name__
                first = False

    async def _start_rewrap(self, record: KeyRecord) -> None:
        progress = self.kms.rewraps.get(record.KeyId)
        if progress is not None and progress.state == "running":
            raise FUSEError(errno.EBUSY)
        progress = self.kms.rewraps[record.KeyId] = RewrapProgress(state="running")
        fresh = self.registry.snapshot().resolve(record.KeyId)
        assert self.nursery is not None
        self.nursery.start_soon(
            functools.partial(trio.to_thread.run_sync, rewrap_key, self.backing, self.envelope, fresh, progress,
                              abandon_on_cancel=True))

    # ================================================================ lookups and attributes

    @_fuse_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode >= CONTROL_BASE:
            node = self.control.node(parent_inode)
            if name == b".":
                return self.control.attrs(node)
            if name == b"..":
                if not node.path:
                    return self._attrs(self.inodes[pyfuse3.ROOT_INODE], os.fstat(self.inodes[pyfuse3.ROOT_INODE].fd))
                return self.control.attrs(self.control.parent(node))
            return self.control.attrs(self.control.lookup(node, _control_name(name)))
        parent = self._inode(parent_inode)
        if parent_inode == pyfuse3.ROOT_INODE:
            if name == CONTROL_NAME:
                return self.control.attrs(self.control.root)
            if name in RESERVED_ROOT_NAMES:
                raise FUSEError(errno.ENOENT)
            if name == b"..":
                name = b"."
        try:
            return await self._new_entry(parent, name)
        except FileNotFoundError:
            # A negative entry the kernel may cache: creators look names up
            # first, and each miss would otherwise be another request.
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = ENTRY_TIMEOUT
            return entry

    @_fuse_op
    @_uncounted
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            if ino >= CONTROL_BASE:
                continue  # virtual nodes live as long as the mount
            inode = self.inodes.get(ino)
            if inode is not None:
                self._forget_one(inode, count)

    @_fuse_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode >= CONTROL_BASE:
            return self.control.attrs(self.control.node(inode))
        node = self._inode(inode)
        return self._attrs(node, os.fstat(node.fd))

    @_fuse_op
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode >= CONTROL_BASE:
            # O_TRUNC on a control file arrives as a truncate to 0: nothing to do.
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise FUSEError(errno.EPERM)
            return self.control.attrs(self.control.node(inode))
        node = self._inode(inode)
        if fields.update_size:
            if not stat.S_ISREG(node.mode):
                raise FUSEError(errno.EINVAL)
            await self._truncate(node, attr.st_size, ctx)
            self._drop_set_id_bits_for(node, ctx)
        target = self._attr_target(node)
        if fields.update_mode:
            if stat.S_ISLNK(node.mode):
                raise FUSEError(errno.EOPNOTSUPP)
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid)
        if fields.update_atime and fields.update_mtime:  # utimensat, futimens, touch, tar
            os.utime(target, ns=(attr.st_atime_ns, attr.st_mtime_ns))
        elif fields.update_atime or fields.update_mtime:  # one of them: keep the other
            old = os.fstat(node.fd)
            atime = attr.st_atime_ns if fields.update_atime else old.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns
            os.utime(target, ns=(atime, mtime))
        st = os.fstat(node.fd)
        self._note_own_change(node, st)
        return self._attrs(node, st)

    async def _truncate(self, node: Inode, size: int, ctx: pyfuse3.RequestContext) -> None:
        # truncate(2) comes without a handle: check as an open would, and take
        # a reference of our own.
        open_file = await self._acquire_checked(node, os.O_RDWR, ctx)
        try:
            async with node.lock:
                self._require_usable(node, open_file)
                if open_file.cipher_file is None:
                    if size == 0:
                        return
                    await self._give_header(node, open_file)
                assert open_file.cipher_file is not None
                await self._in_thread(node, open_file.cipher_file.truncate, size)
                self._note_own_change(node)
        finally:
            self._release_open(node)

    @_fuse_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        return os.fsencode(os.readlink("", dir_fd=node.fd))

    @_fuse_op
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """access(2) and chdir(2), on a mount without default_permissions.

        Only root's mount for root alone is made without it (see
        _kernel_checks_permissions in kmsfs/mount.py); with it, the kernel
        answers these itself.  Without an answer here it would let every
        access(2) pass, X_OK on a file that no one may execute included.
        """
        if inode >= CONTROL_BASE:
            attrs = self.control.attrs(self.control.node(inode))
            st_mode, st_uid, st_gid = attrs.st_mode, attrs.st_uid, attrs.st_gid
        else:
            st = os.fstat(self._inode(inode).fd)
            st_mode, st_uid, st_gid = st.st_mode, st.st_uid, st.st_gid
        return self._mode_permits(st_mode, st_uid, st_gid, mode, ctx)

    def _mode_permits(self, st_mode: int, st_uid: int, st_gid: int, mask: int, ctx: pyfuse3.RequestContext) -> bool:
        """The kernel's check of mode bits (generic_permission), without ACLs.

        Root may read and write anything, and execute what is a directory or
        has at least one execute bit.  Anyone else gets the owner's, the
        group's or the others' bits, whichever class they fall in first.
        """
        mask &= os.R_OK | os.W_OK | os.X_OK
        if ctx.uid == 0:
            return not mask & os.X_OK or stat.S_ISDIR(st_mode) or bool(st_mode & 0o111)
        if ctx.uid == st_uid:
            allowed = (st_mode >> 6) & 0o7
        elif self._in_group(st_gid, ctx.gid, ctx.pid):
            allowed = (st_mode >> 3) & 0o7
        else:
            allowed = st_mode & 0o7
        return mask & ~allowed == 0

    @_fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(_proc(self.inodes[pyfuse3.ROOT_INODE].fd))
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, name, getattr(sv, name))
        data.f_namemax = sv.f_namemax
        return data

    # ================================================================ directory changes

    @_fuse_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode >= CONTROL_BASE:
            node = await self.control.mkdir(self.control.node(parent_inode), _control_name(name, errno.EINVAL),
                                            self._caller(ctx))
            return self.control.attrs(node)
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.fd)
        self._chown_new(parent, name, ctx)
        return await self._new_entry(parent, name)

    @_fuse_op
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        if stat.S_ISREG(mode):
            fd, _, _ = await self._create_file(parent, name, mode, ctx)
            os.close(fd)
        else:
            os.mknod(name, mode, rdev, dir_fd=parent.fd)
            self._chown_new(parent, name, ctx)
        return await self._new_entry(parent, name)

    @_fuse_op
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        os.symlink(target, name, dir_fd=parent.fd)
        self._chown_new(parent, name, ctx)
        return await self._new_entry(parent, name)

    @_fuse_op
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check_name(new_parent_inode, new_name)
        if inode >= CONTROL_BASE:
            raise FUSEError(errno.EPERM)
        node = self._inode(inode)
        parent = self._inode(new_parent_inode)
        # linkat through /proc with AT_SYMLINK_FOLLOW links the inode itself,
        # without the CAP_DAC_READ_SEARCH that AT_EMPTY_PATH would need.
        os.link(_proc(node.fd), new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return await self._new_entry(parent, new_name)

    @_fuse_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_name(parent_inode, name)
        os.unlink(name, dir_fd=self._inode(parent_inode).fd)

    @_fuse_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_name(parent_inode, name)
        os.rmdir(name, dir_fd=self._inode(parent_inode).fd)

    @_fuse_op
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:
        if parent_inode_old >= CONTROL_BASE or parent_inode_new >= CONTROL_BASE:
            if parent_inode_old < CONTROL_BASE or parent_inode_new < CONTROL_BASE:
                raise FUSEError(errno.EXDEV)
            if flags & ~pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EINVAL)  # aliases are unique: NOREPLACE is always true
            await self.control.rename(self.control.node(parent_inode_old), _control_name(name_old),
                                      self.control.node(parent_inode_new), _control_name(name_new, errno.EINVAL),
                                      self._caller(ctx))
            return
        self._check_name(parent_inode_old, name_old)
        self._check_name(parent_inode_new, name_new)
        old_fd = self._inode(parent_inode_old).fd
        new_fd = self._inode(parent_inode_new).fd
        self._dir_policy.clear()  # a moved directory inherits from new ancestors
        if flags == 0:
            os.rename(name_old, name_new, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            return
        if _libc.renameat2(old_fd, name_old, new_fd, name_new, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    # ================================================================ regular files

    async def _hsm(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the HSM inline while it answers fast, in a worker thread once it doesn't.

        A local SoftHSM2 answers in well under a millisecond, no more than a
        thread round trip costs (see HSM_INLINE_MAX); a network HSM may take
        milliseconds, which must not stall the loop.
        The moving average of measured calls decides; one slow call switches
        to threads, and threaded calls keep measuring, so it switches back.
        """
        if self._hsm_latency < HSM_INLINE_MAX:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._note_hsm_latency(time.perf_counter() - start)
        return await trio.to_thread.run_sync(self._timed_hsm_call, fn, *args)

    def _timed_hsm_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Timed inside the worker: the thread round trip is not the HSM's
        # latency, and counting it would keep a fast HSM on threads for good.
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._note_hsm_latency(time.perf_counter() - start)

    def _note_hsm_latency(self, elapsed: float) -> None:
        self._hsm_latency = elapsed if elapsed > 10 * HSM_INLINE_MAX else 0.8 * self._hsm_latency + 0.2 * elapsed

    async def _in_thread(self, node: Inode, fn: Callable[..., Any], *args: Any, size: int = INLINE_MAX + 1) -> Any:
        """Run disk I/O and bulk crypto off the trio loop; name damage precisely.

        Requests of at most INLINE_MAX bytes run on the loop itself: handing
        them to a worker thread and back costs more than the work.
        """
        if size <= INLINE_MAX:
            return self._on_loop(node, fn, *args)
        try:
            return await fuseloop.run_cpu_bound(fn, *args)
        except BlockAuthError as exc:
            raise self._damage(node, exc) from None

    def _on_loop(self, node: Inode, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run file I/O and its crypto on the loop itself; name damage precisely."""
        try:
            return fn(*args, **kwargs)
        except BlockAuthError as exc:
            raise self._damage(node, exc) from None

    def _damage(self, node: Inode, exc: BlockAuthError) -> IntegrityError:
        """A tampered or damaged block, named by the file's path (EIO for the caller)."""
        return IntegrityError(f"{self._path_for_log(node)}: {exc}")

    async def _effective_key_and_context(self, parent: Inode) -> tuple[KeyRecord, bytes]:
        """The CMK and encryption context that the nearest ancestors name.

        Cached per directory for ENTRY_TIMEOUT, since every create asks: the
        cache is dropped whenever this mount changes one of those xattrs or
        moves a directory; changes behind the mount's back show after the timeout.
        """
        now = time.monotonic()
        cached = self._dir_policy.get(parent.ino)
        if cached is not None and now - cached[2] < ENTRY_TIMEOUT:
            key_ref, context_bytes = cached[0], cached[1]
        else:
            key_ref, context_bytes = self._walk_key_and_context(parent)
            if len(self._dir_policy) > 4096:
                self._dir_policy.clear()
            self._dir_policy[parent.ino] = (key_ref, context_bytes, now)
        registry = self.registry.snapshot()
        key = registry.resolve(key_ref) if key_ref else registry.default()
        return key, context_bytes

    def _walk_key_and_context(self, parent: Inode) -> tuple[str | None, bytes]:
        key_ref: str | None = None
        context: bytes | None = None
        fd = os.open(_proc(parent.fd), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while key_ref is None or context is None:
                path = _proc(fd)
                if key_ref is None:
                    key_ref = _get_xattr_or_none(path, KEY_XATTR)
                if context is None:
                    raw = _get_xattr_or_none(path, CONTEXT_XATTR)
                    # Canonical form, as headers require: "{}" (an explicitly empty
                    # context, which stops inheritance) becomes b"".
                    context = None if raw is None else canonical_context(parse_context(raw))
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == self._root_dev_ino:
                    break
                up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = up
        finally:
            os.close(fd)
        return key_ref, context or b""

    async def _create_file(self, parent: Inode, name: bytes, mode: int,
                           ctx: pyfuse3.RequestContext) -> tuple[int, Header, ContentCipher]:
        """Create a regular file with a fresh header.

        Returns an O_RDWR fd, the header and the cipher: the new DEK is used
        as it is, so creating a file costs exactly one HSM call (the wrap).
        """
        key, context = await self._effective_key_and_context(parent)
        self._require_grant(ctx, key, "CreateFile")
        header, cipher = await self._hsm(self.envelope.seal_new, key, context)
        open_flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
        fd = os.open(name, open_flags, stat.S_IMODE(mode), dir_fd=parent.fd)
        try:
            os.setxattr(fd, HEADER_XATTR, header.to_bytes())
            self._chown_new(parent, name, ctx)
            if mode & (stat.S_ISUID | stat.S_ISGID):
                # chown(2) clears these bits of a regular file, even when root changes
                # its owner; the kernel has already dropped any the creator may not set.
                os.fchmod(fd, stat.S_IMODE(mode))
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=parent.fd)
            raise
        return fd, header, cipher

    @_fuse_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_name(parent_inode, name)
        parent = self._inode(parent_inode)
        try:
            fd, header, cipher = await self._create_file(parent, name, mode, ctx)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Lost a race with another creator: open what is there, as open(2) would.
            entry = await self._new_entry(parent, name)
            info = await self.open(entry.st_ino, flags & ~os.O_CREAT, ctx)
            return info, entry
        inode, st = self._remember(parent.fd, name)
        async with inode.lock:
            if inode.open_file is None:
                # One reference of our own, dropped after _open_handle took the handle's.
                inode.open_file = OpenFile(fd, header, self._cipher_file(fd, cipher), handles=1)
                inode.key_id = inode.open_file.key_id
            else:  # someone opened it between our create and now (another link)
                os.close(fd)
                inode.open_file.handles += 1
        try:
            fh = await self._open_handle(inode, flags, ctx)
        except BaseException:
            # Refused after all (its key was disabled meanwhile, say): the caller
            # gets the error, so the new file must not stay behind, and the
            # references taken above go, as the kernel never saw this entry.
            async with inode.lock:
                self._release_open(inode)
            try:
                now = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(name, dir_fd=parent.fd)
            except OSError:
                log.warning("could not remove %s after its create failed", self._path_for_log(parent), exc_info=True)
            self._forget_one(inode, 1)
            raise
        async with inode.lock:
            self._release_open(inode)  # _open_handle took its own reference
        inode.cache_stamp = _stamp(st)  # taken after the header and owner were set
        direct = self._file_handle(fh).direct
        return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct), self._attrs(inode, st)

    @_fuse_op
    @_uncounted
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.client_spinner is not None:
            # A program opening file after file (tar, cp -r, grep -r) is slower
            # with the helper spinning: see ClientSpinner.note_open.
            self.client_spinner.note_open()
        if inode >= CONTROL_BASE:
            handle = await self.control.open(self.control.node(inode), flags, self._caller(ctx))
            # direct_io: control files are answered fresh on every read, never cached.
            return pyfuse3.FileInfo(fh=self._new_fh(handle), direct_io=True, keep_cache=False)
        node = self._inode(inode)
        fh = await self._open_handle(node, flags, ctx)
        if flags & os.O_TRUNC:
            try:
                await self._truncate(node, 0, ctx)
                self._drop_set_id_bits_for(node, ctx)
            except BaseException:
                await self._close_handle(fh)
                raise
        # Cached plaintext stays only if the backing file is exactly as it was
        # when we last served or changed it: damage or changes made behind our
        # back (another mount, an editor on the backing store) are seen at once.
        stamp = _stamp(os.fstat(node.fd))
        keep = node.cache_stamp is not None and node.cache_stamp == stamp
        node.cache_stamp = stamp
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=self._file_handle(fh).direct)

    async def _open_handle(self, node: Inode, flags: int, ctx: pyfuse3.RequestContext) -> int:
        await self._acquire_checked(node, flags, ctx)
        handle = FileHandle(node, flags, direct=self._serves_direct(flags))
        if flags & os.O_ACCMODE != os.O_RDONLY:
            handle.drops_set_id = self._set_id_writer(ctx)
        return self._new_fh(handle)

    def _serves_direct(self, flags: int) -> bool:
        """Whether a handle opened with ``flags`` is served with direct_io.

        Write-only handles are: their writes then bypass the kernel's page
        cache, and each write(2) becomes one WRITE request.  Through the page
        cache (write-through, as the writeback cache is off), a write that
        starts inside a page the cache does not hold whole is split at that
        page's end, and, with libfuse's INIT flags (kmsfs/fuseinit.py), each
        write(2) is preceded by a GETXATTR of security.capability.  ``tar xf``
        of 2,445 files with those flags: 11,279 WRITE and 9,735 GETXATTR
        requests, against 7,290 and 2,445 direct; 27% fewer requests in all.
        Nothing is lost by it: a write-only descriptor cannot be mapped, and
        the kernel drops its cached pages of the range before a direct write,
        so readers and mappings through other descriptors stay coherent.  What
        the kernel leaves to us for these writes is dropping set-id bits (see
        _drop_set_id_bits).  With -o writeback_cache the cache is the point,
        so every handle goes through it.
        """
        return flags & os.O_ACCMODE == os.O_WRONLY and not self.enable_writeback_cache

    def _drop_set_id_bits(self, node: Inode, writer: tuple[int, int, int]) -> None:
        """Before a write, or after a truncate: drop the set-id bits that ext4 drops.

        The rule is the kernel's (setattr_should_drop_suidgid): set-user-ID
        always, set-group-ID when group-executable or when the writer is not
        in the file's group, unless the writer has CAP_FSETID, which is taken
        to mean root; for a write the writer is taken to be the opener.  The
        kernel leaves this to us: with FUSE_HANDLE_KILLPRIV_V2 (kmsfs/fuseinit.py)
        for every write and truncate, and for direct writes in any case; it
        flags them (FUSE_WRITE_KILL_SUIDGID and the like), but pyfuse3 does not
        pass those flags on.  Without it, for writes through the page cache it
        sends a SETATTR first, but FUSE's leaves out the writer who is not in
        the group (fuse_setattr).  Only a daemon running as root gets here:
        one that is not has no CAP_FSETID, so its own pwrite and ftruncate
        drop them.
        """
        st = os.fstat(node.fd)
        if not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            return
        drop = st.st_mode & stat.S_ISUID
        if st.st_mode & stat.S_ISGID:
            _uid, gid, pid = writer
            if st.st_mode & stat.S_IXGRP or not self._in_group(st.st_gid, gid, pid):
                drop |= stat.S_ISGID
        if not drop:
            return
        os.chmod(self._attr_target(node), stat.S_IMODE(st.st_mode) & ~drop)
        # The kernel's cached mode still has the bits (an exec would honour
        # them): attributes only, so no page lock is involved and this is safe
        # to do while answering the request.
        try:
            pyfuse3.invalidate_inode(node.ino, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    @staticmethod
    def _attr_target(node: Inode) -> int | str:
        """What chmod, chown and utime of ``node``'s backing file go through.

        An open file's descriptor spares the kernel the walk through /proc
        (fchmod 1.6 us against chmod of /proc/self/fd/N 5.3 us here): tar sets
        the times, owner and mode of each file it extracts while it is open,
        and writes drop set-id bits through it.  The O_PATH descriptor cannot
        be used for these directly.
        """
        return node.open_file.fd if node.open_file is not None else _proc(node.fd)

    def _set_id_writer(self, ctx: pyfuse3.RequestContext) -> tuple[int, int, int] | None:
        """(uid, gid, pid) of a caller whose writes and truncates must drop set-id
        bits; None for root, and for every caller of a daemon not running as root
        (see _drop_set_id_bits)."""
        return (ctx.uid, ctx.gid, ctx.pid) if self._as_root and ctx.uid != 0 else None

    def _drop_set_id_bits_for(self, node: Inode, ctx: pyfuse3.RequestContext) -> None:
        """_drop_set_id_bits after a truncate by ``ctx``'s caller (truncate(2), open with O_TRUNC)."""
        writer = self._set_id_writer(ctx)
        if writer is not None:
            self._drop_set_id_bits(node, writer)

    @staticmethod
    def _in_group(file_gid: int, gid: int, pid: int) -> bool:
        if file_gid == gid:
            return True
        try:
            return file_gid in pyfuse3.get_sup_groups(pid)
        except (OSError, ValueError):
            return False  # the opener is gone: drop the bit, the safe side

    async def _acquire_checked(self, node: Inode, flags: int, ctx: pyfuse3.RequestContext) -> OpenFile:
        """_acquire, plus the key-state and grant checks of every use of a file."""
        try:
            open_file = await self._acquire(node, flags)
        except KeyUnusable as exc:
            self.kms.audit(self._caller(ctx), "OpenFile", node.key_id or "", "denied", str(exc))
            raise
        try:
            try:
                self._require_usable(node, open_file)
            except KeyUnusable as exc:
                self.kms.audit(self._caller(ctx), "OpenFile", open_file.key_id or "", "denied", str(exc))
                raise
            if open_file.header is not None and ctx.uid not in (0, self.kms.admin_uid):
                self._require_grant(ctx, self.envelope.key_of(open_file.header), "OpenFile")
        except BaseException:
            async with node.lock:
                self._release_open(node)
            raise
        return open_file

    async def _acquire(self, node: Inode, flags: int) -> OpenFile:
        """Open the backing file and unwrap its DEK, once for all handles of the inode."""
        # Before this file's own header read, which may wait for the disk.
        warmed = self._prefetch_after(node.listed) if node.listed is not None else True
        async with node.lock:
            open_file = node.open_file
            if open_file is not None:
                open_file.handles += 1
                return open_file
            try:
                fd = os.open(_proc(node.fd), os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                if flags & os.O_ACCMODE != os.O_RDONLY:
                    raise
                fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    raise
                fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_CLOEXEC)
            if not warmed:
                # The first file opened in a directory (no helper was asked
                # for it): its data read then overlaps the header read below
                # instead of waiting after it.
                start_reading(fd)
            try:
                open_file = await self._load(node, fd)
            except BaseException:
                os.close(fd)
                raise
            open_file.handles = 1
            node.open_file = open_file
            node.key_id = open_file.key_id
        return open_file

    def _prefetch_after(self, listed: tuple[Listing, int]) -> bool:
        """Warm the backing cache for the files listed after one being opened.

        Reading a tree (tar, cp -r, grep -r) opens the files of a directory in
        the order readdir gave them, and cold, each open waits for the disk
        twice: the header xattr (a block of its own on ext4, as it does not fit
        in the inode) and the first data blocks.  A helper process reads the
        next files' headers and asks for their data (kmsfs/prefetch.py), so
        these waits overlap instead of adding up.  Nothing is decrypted, no
        key is used: the opens themselves still do all the checks.

        Like the kernel's readahead, the window starts small (one file read
        from a big directory should not pull in many others) and doubles with
        each refill while the reader keeps going, up to PREFETCH_FILES_MAX.
        Measured on the bench tree (cold tar cf, 3 interleaved rounds): a fixed
        16 files and one worker thread 1.36-1.44 s, up to 64 files and two
        worker threads 1.22-1.33 s; see kmsfs/prefetch.py for the helper process.

        Returns whether the helper had been asked for this file itself.
        """
        if self.prefetcher is None:
            return True
        listing, index = listed
        window = listing.window
        warmed = index < listing.prefetched_to
        if listing.prefetched_to > index + window // 2:
            return warmed
        parent = self.inodes.get(listing.dir_ino)
        if parent is None:
            return warmed
        start = max(index + 1, listing.prefetched_to)
        names = listing.names[start:index + 1 + window]
        listing.prefetched_to = index + 1 + window
        listing.window = min(2 * window, PREFETCH_FILES_MAX)
        if names:
            # The helper gets a descriptor of its own with the message.
            self.prefetcher.request(parent.fd, names)
        return warmed

    async def _load(self, node: Inode, fd: int) -> OpenFile:
        try:
            raw = self._stored_header(fd)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            if os.fstat(fd).st_size == 0:
                return OpenFile(fd, None, None)
            raise HeaderError(
                f"{self._path_for_log(node)}: the header (xattr {HEADER_XATTR}) is missing on a "
                f"non-empty file; was the store copied without xattrs?"
            ) from None
        try:
            # A header this mount made or opened lately comes parsed, with its
            # cipher, from the DEK cache; the CMK's state is checked either way.
            opened = self.envelope.open_cached(raw)
        except (KeyNotFound, KeyUnusable) as exc:
            raise type(exc)(f"{self._path_for_log(node)}: {exc}") from None
        if opened is not None:
            header, cipher = opened
            self._require_store_geometry(node, header)
        else:
            try:
                header = self.envelope.parse(raw)
            except HeaderError as exc:
                raise HeaderError(f"{self._path_for_log(node)}: bad header: {exc}") from None
            self._require_store_geometry(node, header)
            try:
                cipher = await self._hsm(functools.partial(self.envelope.open, look_in_cache=False), header)
            except (HsmError, KeyNotFound, KeyUnusable) as exc:
                raise type(exc)(f"{self._path_for_log(node)}: {exc}") from None
        return OpenFile(fd, header, self._cipher_file(fd, cipher))

    def _stored_header(self, fd: int) -> bytes:
        """The backing file's header xattr, from the header memo if the file is unchanged since it was read.

        OSError as from getxattr: ENODATA for a file without one.
        """
        memo = self.header_memo
        slot = self._memo_slot(fd) if memo is not None else None
        if memo is None or slot is None:
            return os.getxattr(fd, HEADER_XATTR)
        raw = memo.get(*slot)
        if raw is None:
            # The stamp was taken before the read: see HeaderMemo.put.
            raw = os.getxattr(fd, HEADER_XATTR)
            memo.put(*slot, raw)
        return raw

    def _memo_slot(self, fd: int) -> tuple[tuple[int, int], tuple[int, int, int]] | None:
        """The header memo's key and the file's stamp, now; None for a file on another device."""
        st = os.fstat(fd)
        if st.st_dev != self.header_memo_dev:
            return None
        return (st.st_dev, st.st_ino), _stamp(st)

    def _cipher_file(self, fd: int, cipher: ContentCipher) -> CipherFile:
        """A backing file's content I/O, with this mount's truncation journal and decrypt helper."""
        return CipherFile(fd, cipher, self.truncations, self.decrypt_helper, self.direct_reads)

    def _require_store_geometry(self, node: Inode, header: Header) -> None:
        if header.block_size != self.block_size or header.version != self.envelope.format_version:
            raise HeaderError(
                f"{self._path_for_log(node)}: header format {header.version} with block size "
                f"{header.block_size} differs from the store's (format {self.envelope.format_version}, "
                f"block size {self.block_size})"
            )

    async def _give_header(self, node: Inode, open_file: OpenFile) -> None:
        """A header for an empty file that has none (created behind our back)."""
        key = self.registry.snapshot().default()
        header, cipher = await self._hsm(self.envelope.seal_new, key, b"")
        os.setxattr(open_file.fd, HEADER_XATTR, header.to_bytes())
        open_file.header = header
        open_file.cipher_file = self._cipher_file(open_file.fd, cipher)
        node.key_id = open_file.key_id

    def _note_own_change(self, node: Inode, st: os.stat_result | None = None) -> None:
        """Our own change: the kernel's cache saw it, so the cache stays valid.

        ``st``: the backing file's stat taken after the change, if the caller has one.
        """
        if node.cache_stamp is not None:
            node.cache_stamp = _stamp(st if st is not None else os.fstat(node.fd))

    def _release_open(self, node: Inode) -> None:
        open_file = node.open_file
        assert open_file is not None
        open_file.handles -= 1
        if open_file.handles <= 0:
            node.open_file = None
            # Dropping the cipher drops the unwrapped DEK: it lives only while open.
            if open_file.cipher_file is not None:
                open_file.cipher_file.close()
            open_file.cipher_file = None
            if open_file.header is not None and self.header_memo is not None:
                self._remember_header_at_close(open_file.fd, self.header_memo)
            os.close(open_file.fd)
            if node.nlookup <= 0 and node.ino != pyfuse3.ROOT_INODE:
                self._forget_one(node, 0)

    def _remember_header_at_close(self, fd: int, memo: HeaderMemo) -> None:
        """Read the header again as the last handle closes, if the file changed since it was read.

        A file written or changed while open (its stamp moved), or created by
        this mount, has no header in the memo that matches it; the header is
        still in the page cache now, so this costs no disk read, and the next
        open, maybe after the caches were dropped, none either.
        """
        try:
            slot = self._memo_slot(fd)
            if slot is not None and not memo.holds(*slot):
                memo.put(*slot, os.getxattr(fd, HEADER_XATTR))
        except OSError as exc:
            # Removed behind our back, say: the next open finds out and says so.
            log.debug("header not remembered at close: %s", exc)

    def _file_handle(self, fh: int) -> FileHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, FileHandle):
            raise FUSEError(errno.EBADF)
        return handle

    @_fuse_op
    @_uncounted
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        control = self._handles.get(fh)
        if isinstance(control, ControlHandle):
            return await self.control.read(control, off, size)
        handle = self._file_handle(fh)
        if size <= INLINE_MAX and self.client_spinner is not None:
            self.client_spinner.note_request()
        node = handle.inode
        open_file = node.open_file
        assert open_file is not None
        async with node.lock.shared():
            self._require_usable(node, open_file)
            if open_file.cipher_file is None:
                return b""
            cipher_file = open_file.cipher_file
            if size > INLINE_MAX:
                # Decrypting a cached 1 MiB request here costs less than the
                # round trip to a worker thread (see INLINE_MAX).
                try:
                    return self._on_loop(node, cipher_file.read, off, size, nowait=True)
                except WouldBlock:
                    pass
            return await self._in_thread(node, cipher_file.read, off, size, size=size)

    @_fuse_op
    @_uncounted
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        control = self._handles.get(fh)
        if isinstance(control, ControlHandle):
            return await self.control.write(control, off, buf, control.caller)
        handle = self._file_handle(fh)
        if handle.flags & os.O_ACCMODE == os.O_RDONLY:
            raise FUSEError(errno.EBADF)
        if len(buf) <= INLINE_MAX and self.client_spinner is not None:
            self.client_spinner.note_request()
        node = handle.inode
        open_file = node.open_file
        assert open_file is not None
        async with node.lock:
            self._require_usable(node, open_file)
            if open_file.cipher_file is None:
                await self._give_header(node, open_file)
            cipher_file = open_file.cipher_file
            assert cipher_file is not None
            if handle.flags & os.O_APPEND and not self.enable_writeback_cache:
                off = cipher_file.size()  # with writeback the kernel gives the right offset
            if handle.drops_set_id is not None:
                self._drop_set_id_bits(node, handle.drops_set_id)
            if len(buf) <= INLINE_MAX or not await self._write_on_loop(node, cipher_file, off, buf):
                await self._in_thread(node, cipher_file.write, off, buf, size=len(buf))
            written = len(buf)
            self.write_requests["direct" if handle.direct else "cached"] += 1
            if handle.direct:
                # The kernel's cache did not see this write: it dropped the range's
                # pages before sending it, and a reader may have read them back
                # meanwhile.  The next open drops the cache (and no later write
                # through the cache vouches for it: _note_own_change skips None).
                node.cache_stamp = None
            else:
                self._note_own_change(node)
            return written

    async def _write_on_loop(self, node: Inode, cipher_file: CipherFile, off: int, buf: bytes) -> bool:
        """Make a large write on the loop itself, in steps; False if it might wait, and nothing was written.

        Handing a 1 MiB write to a worker thread and back costs two thread
        wake-ups, which on these VMs (halted vCPUs) came to about a fifth of
        the request's time when wake-ups were slow: a 1 GiB ``dd bs=1M``
        took 1.94 s of writing against 1.49 s on the loop (medians of
        alternating rounds; 1.21 against 1.17 s at a quieter time).  Other
        requests get their turn between steps (fuseloop.let_others_in), so
        none waits behind more than one step: done in one go, the write had
        made their 99th percentile 3 to 5 times longer.  Only writes that cannot wait
        for the disk qualify: CipherFile.write_steps checks the pages it
        needs, and the dirty throttle must be far off (kmsfs/dirtyroom.py).
        """
        if self.dirty_room is None or not self.dirty_room.allows(len(buf)):
            return False
        steps = self._on_loop(node, cipher_file.write_steps, off, buf)
        if steps is None:
            return False
        for _ in steps:
            await fuseloop.let_others_in()
        self.write_requests["on_loop"] += 1
        return True

    @_fuse_op
    async def flush(self, fh: int) -> None:
        # Writes go straight to the backing file; there is nothing buffered here.
        # ENOSYS tells the kernel so once for the whole mount: it then sends no
        # FLUSH at all, one request less per close(2) (it still writes back its
        # own dirty pages first, with -o writeback_cache too).
        raise FUSEError(errno.ENOSYS)

    @_fuse_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        if isinstance(self._handles.get(fh), ControlHandle):
            return
        node = self._file_handle(fh).inode
        open_file = node.open_file
        assert open_file is not None
        fd = open_file.fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    @_fuse_op
    @_uncounted
    async def release(self, fh: int) -> None:
        await self._close_handle(fh)

    async def _close_handle(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, FileHandle):
            async with handle.inode.lock:
                self._release_open(handle.inode)

    # ================================================================ directories

    @_fuse_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode >= CONTROL_BASE:
            self.control.node(inode)
            return self._new_fh(ControlDirHandle(inode))
        node = self._inode(inode)
        fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = DirHandle(node, fd)
        return fh

    def _dir_handle(self, fh: int) -> DirHandle:
        handle = self._handles.get(fh)
        if not isinstance(handle, DirHandle):
            raise FUSEError(errno.EBADF)
        return handle

    @_fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        control = self._handles.get(fh)
        if isinstance(control, ControlDirHandle):
            node = self.control.node(control.ino)
            listing = [(".", node), ("..", node), *self.control.children(node)]
            for index in range(start_id, len(listing)):
                name, child = listing[index]
                if not pyfuse3.readdir_reply(token, name.encode(), self.control.attrs(child), index + 1):
                    return
            return
        handle = self._dir_handle(fh)
        node = handle.inode
        if start_id == 0 or handle.names is None:
            names = [os.fsencode(n) for n in os.listdir(handle.fd)]
            if node.ino == pyfuse3.ROOT_INODE:
                names = [n for n in names if n not in RESERVED_ROOT_NAMES]
            handle.names = [b".", b".."] + names
            if node.ino == pyfuse3.ROOT_INODE:
                handle.names.append(CONTROL_NAME)
            handle.listing = Listing(node.ino, handle.names)
        names = handle.names
        for index in range(start_id, len(names)):
            name = names[index]
            if name == CONTROL_NAME and node.ino == pyfuse3.ROOT_INODE:
                if not pyfuse3.readdir_reply(token, name, self.control.attrs(self.control.root), index + 1):
                    return
                continue
            if name in (b".", b".."):
                # The kernel takes no reference for dot entries.
                attrs = self._attrs(node, os.fstat(node.fd))
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    return
                continue
            try:
                inode, st = self._remember(node.fd, name)
            except FileNotFoundError:
                continue  # removed since the listing was taken
            if handle.listing is not None and stat.S_ISREG(st.st_mode):
                inode.listed = (handle.listing, index)
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode, st), index + 1):
                self._forget_one(inode, 1)
                return

    @_fuse_op
    @_uncounted
    async def releasedir(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, DirHandle):
            os.close(handle.fd)

    @_fuse_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        if isinstance(self._handles.get(fh), ControlDirHandle):
            return
        fd = self._dir_handle(fh).fd
        await trio.to_thread.run_sync(os.fsync, fd)

    # ================================================================ extended attributes

    def _header_of(self, node: Inode) -> Header | None:
        # Always from the backing file: a rewrap may have replaced it meanwhile.
        raw = _get_raw_xattr_or_none(_proc(node.fd), HEADER_XATTR)
        if raw is None:
            return None
        try:
            return self.envelope.parse(raw)
        except HeaderError as exc:
            raise HeaderError(f"{self._path_for_log(node)}: bad header: {exc}") from None

    @_fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode >= CONTROL_BASE or not _supported_xattr(name):
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._inode(inode)
        text = os.fsdecode(name)
        if text == HEADER_XATTR or text == PROBE_XATTR:
            raise FUSEError(pyfuse3.ENOATTR)
        if stat.S_ISREG(node.mode) and text in (KEY_XATTR, CONTEXT_XATTR):
            header = self._header_of(node)
            if header is None:
                raise FUSEError(pyfuse3.ENOATTR)
            if text == CONTEXT_XATTR:
                if not header.context:
                    raise FUSEError(pyfuse3.ENOATTR)
                return header.context
            key_id = str(uuid.UUID(bytes=header.key_id))
            try:
                alias = self.registry.snapshot().resolve(key_id).Alias
            except KeyNotFound:
                alias = ""
            return json.dumps({"KeyId": key_id, "Alias": alias, "KeyVersion": header.key_version}).encode()
        return os.getxattr(_proc(node.fd), name)

    @_fuse_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode >= CONTROL_BASE:
            return []
        node = self._inode(inode)
        if stat.S_ISLNK(node.mode):
            return []
        names = [n for n in os.listxattr(_proc(node.fd))
                 if _supported_xattr(os.fsencode(n)) and n not in (HEADER_XATTR, PROBE_XATTR)]
        if stat.S_ISREG(node.mode):
            header = self._header_of(node)
            if header is not None:
                names.append(KEY_XATTR)
                if header.context:
                    names.append(CONTEXT_XATTR)
        return [os.fsencode(n) for n in names]

    @_fuse_op
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode >= CONTROL_BASE:
            raise FUSEError(errno.EPERM)
        if not _supported_xattr(name):
            raise FUSEError(errno.EOPNOTSUPP)
        node = self._inode(inode)
        text = os.fsdecode(name)
        if not text.startswith(_RESERVED_XATTR_PREFIX):
            os.setxattr(_proc(node.fd), name, value)
            return
        if stat.S_ISDIR(node.mode) and text in (KEY_XATTR, CONTEXT_XATTR):
            self._dir_policy.clear()
        if stat.S_ISDIR(node.mode) and text == KEY_XATTR:
            try:
                key = self.registry.snapshot().resolve(value.decode("utf-8", "strict"))
            except (UnicodeDecodeError, KeyNotFound) as exc:
                log.warning("setxattr %s on %s refused: %s", KEY_XATTR, self._path_for_log(node), exc)
                raise FUSEError(errno.EINVAL) from None
            os.setxattr(_proc(node.fd), KEY_XATTR, key.KeyId.encode())
            return
        if stat.S_ISDIR(node.mode) and text == CONTEXT_XATTR:
            try:
                context = parse_context(value)
            except FormatError as exc:
                log.warning("setxattr %s on %s refused: %s", CONTEXT_XATTR, self._path_for_log(node), exc)
                raise FUSEError(errno.EINVAL) from None
            os.setxattr(_proc(node.fd), CONTEXT_XATTR, canonical_context(context) or b"{}")
            return
        if stat.S_ISREG(node.mode) and text == KEY_XATTR:
            await self._rewrap_to(node, value, ctx)
            return
        log.warning("setxattr %s on %s refused: reserved for kmsfs", text, self._path_for_log(node))
        raise FUSEError(errno.EPERM)

    async def _rewrap_to(self, node: Inode, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Move a file to another CMK: rewrap its DEK, the content stays as it is."""
        try:
            key = self.registry.snapshot().resolve(value.decode("utf-8", "strict"))
        except (UnicodeDecodeError, KeyNotFound) as exc:
            log.warning("setxattr %s on %s refused: %s", KEY_XATTR, self._path_for_log(node), exc)
            raise FUSEError(errno.EINVAL) from None
        async with node.lock:
            header = self._header_of(node)
            if header is None:
                raise FUSEError(pyfuse3.ENOATTR)
            self._require_grant(ctx, self.envelope.key_of(header), "MoveFile")
            self._require_grant(ctx, key, "MoveFile")
            new_header = await self._hsm(self.envelope.rewrap, header, key)
            # One setxattr replaces the header atomically on the backing filesystem.
            os.setxattr(_proc(node.fd), HEADER_XATTR, new_header.to_bytes())
            if node.open_file is not None:
                node.open_file.header = new_header
            node.key_id = str(uuid.UUID(bytes=new_header.key_id))
            self._note_own_change(node)
        log.info("rewrapped %s to CMK %s v%d", self._path_for_log(node), key.KeyId, key.CurrentVersion)

    @_fuse_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode >= CONTROL_BASE:
            raise FUSEError(errno.EPERM)
        if not _supported_xattr(name):
            raise FUSEError(errno.EOPNOTSUPP)
        node = self._inode(inode)
        text = os.fsdecode(name)
        if text.startswith(_RESERVED_XATTR_PREFIX) and not (
            stat.S_ISDIR(node.mode) and text in (KEY_XATTR, CONTEXT_XATTR)
        ):
            raise FUSEError(errno.EPERM)
        self._dir_policy.clear()
        os.removexattr(_proc(node.fd), name)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("could not close the descriptor of a forgotten inode: %s", exc)


def _supported_xattr(name: bytes) -> bool:
    """Whether a mount has this xattr: the ``user.`` namespace only.

    The others would describe the backing file, not the plaintext one: its
    SELinux label (``security.selinux``), POSIX ACLs that the mount does not
    enforce (``system.posix_acl_*``), file capabilities (``security.capability``)
    and ``trusted.*``.  They are neither shown nor set.  This also answers the
    ``getxattr`` calls that ``ls -l`` makes for every file, and the one the
    kernel makes before every write, without a look at the backing file, whose
    xattrs (the header among them) live in a disk block of their own.
    """
    return name.startswith(_USER_XATTR_PREFIX)


def _get_raw_xattr_or_none(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _get_xattr_or_none(path: str, name: str) -> str | None:
    raw = _get_raw_xattr_or_none(path, name)
    return None if raw is None else raw.decode("utf-8", "replace")


def _control_name(name: bytes, code: int = errno.ENOENT) -> str:
    """A name in the control directory; not UTF-8: no such entry, or (for a new name) EINVAL."""
    try:
        return name.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise FUSEError(code) from None
