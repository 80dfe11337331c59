"""Starting, serving and stopping a mount (the daemon side of ``kmsfs mount``).

``kmsfs mount`` without ``-f`` starts this same code in a child process and
waits on a pipe until the child reports ``READY`` (mounted) or an error, so
that the command returns only once the mount can be used, or fails with the
child's message.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import resource
import signal
from pathlib import Path

import pyfuse3
import trio

from .dekcache import DekCache
from .dirtyroom import DirtyRoom, memory_limited_cgroup
from .headermemo import HeaderMemo
from .envelope import Envelope
from . import clientspin, directstream, fuseinit, fuseloop
from .fs import KmsfsOperations
from .keyregistry import KeyRegistry, key_changes_settled
from .keystore import HsmError, KeyStore
from .kms import KeyService, KmsError
from .decrypthelper import DecryptHelper
from .prefetch import Prefetcher
from .pkcs11uri import Pkcs11Uri, UriError
from .mounttable import is_mountpoint
from .store import StoreError, check_user_xattrs, ctime_moves_after_stat, load_config, store_dir
from .truncation import TruncationJournal

log = logging.getLogger(__name__)


class MountError(Exception):
    """The mount is refused; the message says why."""


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "kmsfs" if base else Path(f"/tmp/kmsfs-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def pidfile_for(mountpoint: Path) -> Path:
    digest = hashlib.sha256(str(mountpoint.resolve()).encode()).hexdigest()[:24]
    return runtime_dir() / f"{digest}.pid"






#: How many non-empty files the mount looks at to recognise a store copied without xattrs.
XATTR_SAMPLE = 32


def check_headers_present(backing: Path) -> None:
    """Refuse a store whose files all lost their headers (copied without xattrs)."""
    from .format import HEADER_XATTR
    from .fsck import STRIPPED_XATTRS_MESSAGE
    from .treewalk import iter_regular_files

    seen = with_header = 0
    for dir_fd, name, _shown in iter_regular_files(backing):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if st.st_size == 0:
            continue
        seen += 1
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                os.getxattr(f"/proc/self/fd/{fd}", HEADER_XATTR)
                with_header += 1
            finally:
                os.close(fd)
        except OSError:
            pass
        if with_header or seen >= XATTR_SAMPLE:
            break
    if seen and not with_header:
        raise MountError(STRIPPED_XATTRS_MESSAGE)


def check_mountpoint(backing: Path, mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist; create it with mkdir")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    mp = mountpoint.resolve()
    bk = backing.resolve()
    if mp == bk or bk in mp.parents:
        raise MountError(f"mountpoint {mountpoint} lies inside the backing store {backing}")
    if is_mountpoint(mp):
        raise MountError(f"{mountpoint} is already a mountpoint; unmount it first")
    if not os.access(mp, os.W_OK | os.X_OK) and os.geteuid() != 0:
        raise MountError(f"mountpoint {mountpoint} is not writable by you")


#: Mount options that kmsfs itself takes (not passed to FUSE).
KMSFS_OPTIONS = frozenset({"writeback_cache", "libfuse_init"})
#: kmsfs's own options that take a value (``name=value``).
KMSFS_VALUE_OPTIONS = frozenset({"read_ahead_kb", "spin_us", "client_spin_us", "dek_cache", "dek_cache_seconds",
                                 "decrypt_helper", "direct_read", "write_on_loop"})

#: The kernel's readahead window for the mount, in KiB, set at mount time when
#: running as root (through /sys/class/bdi).  FUSE's default is 128 KiB, so a
#: sequential read arrives as 128 KiB requests; with 1 MiB (the largest request
#: the kernel sends, max_pages = 256) there are 8x fewer requests and worker
#: thread round trips.  scripts/bench, cold 256 MiB read: daemon CPU 0.84-1.47 s
#: -> 0.39-0.41 s, wall 1.2-2.1 s -> 0.6-0.7 s.  ``-o read_ahead_kb=N`` overrides
#: it (0 leaves the kernel's default).
READ_AHEAD_KB = 1024
READ_AHEAD_KB_MAX = 1 << 20

#: ``-o spin_us=N``: how long the request loop polls for the next request before
#: it sleeps (kmsfs/fuseloop.py explains why); 0 turns the spin off.
SPIN_US = round(fuseloop.SPIN_INTERVAL * 1e6)
SPIN_US_MAX = 10_000

#: ``-o decrypt_helper=0`` turns off the helper of kmsfs/decrypthelper.py (1, the
#: default, starts it where two or more CPUs are allowed).
DECRYPT_HELPER = 1
DECRYPT_HELPER_MAX = 1

#: ``-o direct_read=0`` makes every read go through the backing file's page
#: cache; 1, the default, lets sequential reads of files outside it go around
#: it with kmsfs's own readahead (kmsfs/directstream.py).
DIRECT_READ = 1
DIRECT_READ_MAX = 1

#: ``-o write_on_loop=0`` hands every large write to a worker thread; 1, the
#: default, lets the request loop make those that cannot wait for the disk
#: itself (KmsfsOperations._write_on_loop).
WRITE_ON_LOOP = 1
WRITE_ON_LOOP_MAX = 1

#: ``-o client_spin_us=N``: how long after a client's last request a
#: helper process keeps that client's CPU awake (kmsfs/clientspin.py explains
#: why); 0 turns the helper off.  Without the option it runs where exactly two
#: CPUs are allowed (where the scheduler puts it on the client's); with it,
#: wherever more than one is.
CLIENT_SPIN_US = clientspin.IDLE_US
CLIENT_SPIN_US_MAX = 1_000_000

#: ``-o dek_cache=N``: how many unwrapped DEKs of files created or opened
#: lately the daemon keeps, so that opening them again costs no HSM call
#: (kmsfs/dekcache.py); 0 turns the cache off.  ``-o dek_cache_seconds=S``:
#: how long one stays after its unwrap.  An entry costs about 3 KiB: it keeps
#: the parsed header and the file's cipher (kmsfs/dekcache.py).
DEK_CACHE = 8192
DEK_CACHE_MAX = 1 << 20
DEK_CACHE_SECONDS = 300
DEK_CACHE_SECONDS_MAX = 86_400

#: How many backing files' headers the daemon remembers (kmsfs/headermemo.py):
#: about 300 bytes each.  Twice the DEK cache: a header read from memory saves
#: a disk read whether or not the DEK is still cached.
HEADER_MEMO = 16384


def _split_options(extra: list[str]) -> tuple[set[str], set[str]]:
    """(FUSE options, kmsfs options) from the -o arguments."""
    fuse: set[str] = set()
    own: set[str] = set()
    for item in extra:
        for option in item.split(","):
            option = option.strip()
            if option:
                mine = option in KMSFS_OPTIONS or option.partition("=")[0] in KMSFS_VALUE_OPTIONS
                (own if mine else fuse).add(option)
    return fuse, own


def _whole_number_option(own: set[str], name: str, default: int, maximum: int) -> int:
    """The value of ``-o name=N`` (0 to maximum); a bad one is reported and the default used."""
    given = _given_whole_number(own, name, default, maximum)
    return default if given is None else given


def _given_whole_number(own: set[str], name: str, default: int, maximum: int) -> int | None:
    """The value of ``-o name=N`` if it was given and is good; a bad one is reported."""
    value = _option_value(own, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= maximum:
        log.warning("ignoring -o %s=%s: not a whole number from 0 to %d; using %d", name, value, maximum, default)
        return None
    return number


def _option_value(own: set[str], name: str) -> str | None:
    for option in own:
        key, sep, value = option.partition("=")
        if key == name and sep:
            return value
    return None


def _mount_device(target: str) -> str | None:
    """major:minor of the filesystem mounted on ``target`` (the newest one there).

    ``target`` is the resolved path, resolved before mounting: once mounted,
    any stat() of it (also Path.resolve()) waits for this very daemon, which
    does not serve requests yet.  Hence /proc/self/mountinfo.
    """
    device = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 4 and _unescape_mount_path(fields[4]) == target:
                    device = fields[2]
    except OSError:
        return None
    return device


def _unescape_mount_path(field: str) -> str:
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _set_read_ahead(target: str, kib: int, init_answered: bool = False) -> None:
    """Raise the mount's readahead window (root only; otherwise the default stays).

    The kernel applies FUSE's own limit when INIT is answered, overwriting
    anything set before.  Unless INIT is known to be answered (fuseinit did
    it), this first stat()s the mountpoint, which returns only after INIT is
    done: blocking, so in a worker thread once the loop serves.  That stat
    keeps the mount busy while it runs, so an unmount at that moment fails
    with EBUSY: one more reason to skip it when it is not needed.
    """
    if kib <= 0:
        return
    try:
        _write_read_ahead(target, kib, init_answered)
    except Exception:  # never end the mount over a tuning knob
        log.warning("could not set read_ahead_kb on %s", target, exc_info=True)


def _write_read_ahead(target: str, kib: int, init_answered: bool) -> None:
    if not init_answered:
        os.stat(target)
    device = _mount_device(target)
    if device is None:
        log.debug("read_ahead_kb: no mountinfo entry for %s", target)
        return
    path = Path("/sys/class/bdi") / device / "read_ahead_kb"
    try:
        path.write_text(f"{kib}\n")
    except OSError as exc:
        log.debug("read_ahead_kb: cannot write %s (%s); the kernel's default stays", path, exc)
        return
    log.info("readahead window %d KiB (%s)", kib, path)


#: FUSE options that let users other than the one who mounted use the mount.
SHARING_OPTIONS = frozenset({"allow_other", "allow_root"})


def _kernel_checks_permissions(extra: set[str], as_root: bool) -> bool:
    """Whether to mount with ``default_permissions``: the kernel then checks
    every access against the file's mode and owner.

    It is left out for a mount that root makes for root alone (no
    allow_other): FUSE lets in only processes whose user and group ids are
    all root's, and root passes every mode check but one, execute on a
    regular file with no execute bit, which the kernel still checks without
    the option (and which ``access`` in kmsfs/fs.py answers for access(2)).
    What it saves: with the option, every create in a directory invalidates
    the directory's attributes, so the next create there sends a GETATTR of
    the directory first, for the kernel's check; ``tar xf`` of the bench tree,
    2,498 of 27,940 requests.  A user's own mount keeps the option: the
    daemon opens each backing file once for all of the file's handles, so the
    backing filesystem cannot do the kernel's check for a later open.
    """
    return not as_root or bool(extra & SHARING_OPTIONS) or "default_permissions" in extra


def _fuse_options(backing: Path, extra: set[str], as_root: bool) -> set[str]:
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname=kmsfs:{backing.resolve()}", "subtype=kmsfs"}
    if _kernel_checks_permissions(extra, as_root):
        options.add("default_permissions")
    return options | extra


def prepare(backing: Path, mountpoint: Path, uri_override: str | None) -> tuple[KmsfsOperations, KeyStore]:
    """Every check that can refuse a mount, then the operations object."""
    config = load_config(backing)
    check_mountpoint(backing, mountpoint)
    check_user_xattrs(store_dir(backing))
    try:
        uri = Pkcs11Uri.parse(uri_override) if uri_override else config.uri()
    except UriError as exc:
        raise MountError(f"bad PKCS#11 URI: {exc}") from exc
    module = Path(uri.module_path).resolve()
    if backing.resolve() in module.parents:
        raise MountError(f"refusing PKCS#11 module {uri.module_path}: it lies inside the backing store")
    # A daemon killed inside a truncate left its intent record: finish it first.
    for done in TruncationJournal(backing).complete_pending():
        log.warning("after a crash: %s", done)
    # A key change may still be in flight in its helper, e.g. right after a
    # kill -9 of the previous daemon: see the HSM and keys.json only after it.
    with key_changes_settled(backing):
        keystore = KeyStore(uri, config.hsm_env)
        try:
            check_headers_present(backing)
            registry = KeyRegistry(backing)
            default = registry.snapshot().default()
            found = keystore.has_key(default.key_uuid, default.CurrentVersion)
        except BaseException:
            keystore.close()
            raise
    try:
        if not found:
            raise MountError(
                f"the default CMK {default.KeyId} is not on token {uri.token!r}: "
                f"is this the HSM the store was created with?"
            )
        envelope = Envelope(keystore, registry, config.block_size, config.format_version)
        kms = KeyService(backing, keystore, registry, admin_uid=os.getuid())
        kms.run_due()  # expired deletion windows and due rotations, before serving

        def status() -> dict[str, object]:
            return {
                "store_id": config.store_id,
                "format_version": config.format_version,
                "block_size": config.block_size,
                "backing": str(backing.resolve()),
                "hsm": {"module": uri.module_path, "token": uri.token, "embedded": config.embedded_hsm},
                **kms.status(),
                "hsm_calls": dict(keystore.calls),
                "dek_cache": envelope.dek_cache.stats() if envelope.dek_cache is not None else None,
                "prefetch": ops.prefetcher.stats() if ops.prefetcher is not None else None,
                "client_spin": ops.client_spinner.stats() if ops.client_spinner is not None else None,
                "decrypt_helper": ops.decrypt_helper.stats() if ops.decrypt_helper is not None else None,
                "direct_read": directstream.stats() if ops.direct_reads else None,
                "header_memo": ops.header_memo.stats() if ops.header_memo is not None else None,
                "write_requests": dict(ops.write_requests),
                "write_on_loop": ops.dirty_room.stats() if ops.dirty_room is not None else None,
                "fuse_init": None if ops.init_flags is None else {
                    "flags": hex(ops.init_flags.flags),
                    "handle_killpriv_v2": ops.init_flags.handle_killpriv_v2,
                    "auto_inval_data": ops.init_flags.auto_inval_data,
                },
                "open_files": sum(1 for i in ops.inodes.values() if i.open_file is not None),
                "known_inodes": len(ops.inodes),
            }

        ops = KmsfsOperations(backing, envelope, registry, config.block_size, kms, status)
        ops.header_memo, ops.header_memo_dev = _header_memo(backing)
    except BaseException:
        keystore.close()
        raise
    return ops, keystore


def _header_memo(backing: Path) -> tuple[HeaderMemo | None, int]:
    """The header memo (kmsfs/headermemo.py) and the device it serves, if the store's ctimes allow one."""
    directory = store_dir(backing)
    if not ctime_moves_after_stat(directory):
        log.info("header memo off: on this filesystem a change right after a stat may keep the file's ctime, "
                 "so every open reads its header from the backing file")
        return None, -1
    log.info("header memo: the headers of up to %d files are remembered while the files are unchanged", HEADER_MEMO)
    return HeaderMemo(HEADER_MEMO), os.stat(directory).st_dev


def _raise_fd_limit() -> None:
    # Every inode the kernel holds costs one O_PATH descriptor.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap, not from mmap: every request of
#: up to 1 MiB allocates one for its data, on the request loop's thread too.
MALLOC_MMAP_THRESHOLD = 4 << 20
#: Free memory the heap keeps instead of handing back to the kernel.
MALLOC_TRIM_THRESHOLD = 16 << 20


def _tune_allocator() -> None:
    """Keep glibc from mapping and unmapping a fresh buffer for every big request.

    By default glibc serves 1 MiB from the main thread's heap only after the
    first one is freed, and hands the freed memory back to the kernel as soon
    as two of them lie free at the top of the heap; the next request
    page-faults it all in again (on these VMs, the host takes it back too).
    Reading 512 MiB with the request loop decrypting: 248,000 page faults,
    0 after this.  Worker threads' heaps did not show it.  Fixed thresholds
    cost at most MALLOC_TRIM_THRESHOLD of resident memory per heap.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        log.debug("no mallopt: the C library's default allocation policy stays")
        return
    if not (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)):
        log.debug("mallopt refused the thresholds; the default allocation policy stays")


def serve(
    backing: Path, mountpoint: Path, options: list[str], uri_override: str | None,
    ready_fd: int | None = None,
) -> int:
    """Mount and serve until unmounted or signalled.  Returns an exit status."""

    def report(message: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (message + "\n").encode())
            except OSError:
                pass

    try:
        ops, keystore = prepare(backing, mountpoint, uri_override)
    except (MountError, StoreError, HsmError, UriError) as exc:
        log.error("mount refused: %s", exc)
        report(f"ERROR {exc}")
        return 1
    _raise_fd_limit()
    _tune_allocator()
    # Resolved before mounting: once mounted, touching the mountpoint would
    # wait for this very process to serve it.
    pidfile = pidfile_for(mountpoint)
    resolved_mountpoint = str(mountpoint.resolve())
    # Modes arrive from the kernel with the caller's umask already applied.
    os.umask(0)
    fuse_options, own_options = _split_options(options)
    read_ahead_kb = _whole_number_option(own_options, "read_ahead_kb", READ_AHEAD_KB, READ_AHEAD_KB_MAX)
    spin_us = _whole_number_option(own_options, "spin_us", SPIN_US, SPIN_US_MAX)
    # Given and good: a bad value is ignored, and does not count as asking for the helper.
    client_spin_given = _given_whole_number(own_options, "client_spin_us", CLIENT_SPIN_US, CLIENT_SPIN_US_MAX)
    client_spin_us = CLIENT_SPIN_US if client_spin_given is None else client_spin_given
    dek_cache = _whole_number_option(own_options, "dek_cache", DEK_CACHE, DEK_CACHE_MAX)
    dek_cache_seconds = _whole_number_option(own_options, "dek_cache_seconds", DEK_CACHE_SECONDS,
                                             DEK_CACHE_SECONDS_MAX)
    if dek_cache and dek_cache_seconds:
        ops.envelope.dek_cache = DekCache(dek_cache, dek_cache_seconds)
        log.info("DEK cache: up to %d files' keys for %d s after their unwrap", dek_cache, dek_cache_seconds)
    else:
        log.info("DEK cache off: every first open of a file asks the HSM")
    ops.direct_reads = bool(_whole_number_option(own_options, "direct_read", DIRECT_READ, DIRECT_READ_MAX))
    if not ops.direct_reads:
        log.info("direct reads off (-o direct_read=0): every read goes through the backing file's page cache")
    if _whole_number_option(own_options, "write_on_loop", WRITE_ON_LOOP, WRITE_ON_LOOP_MAX):
        ops.dirty_room = DirtyRoom(limited_by=memory_limited_cgroup())
    else:
        log.info("large writes on the loop off (-o write_on_loop=0): every large write goes to a worker thread")
    if "writeback_cache" in own_options:
        ops.enable_writeback_cache = True
        log.info("writeback cache on: changes made behind this mount's back may go unseen")
    # Started before the mount, so that it cannot inherit /dev/fuse: a helper
    # holding it would keep the mount alive after the daemon's death.
    ops.prefetcher = _start_prefetcher()
    ops.client_spinner = _start_client_spinner(client_spin_us, asked=client_spin_given is not None)
    ops.decrypt_helper = _start_decrypt_helper(
        _whole_number_option(own_options, "decrypt_helper", DECRYPT_HELPER, DECRYPT_HELPER_MAX))
    try:
        pyfuse3.init(ops, str(mountpoint), _fuse_options(backing, fuse_options, os.geteuid() == 0))
    except RuntimeError as exc:
        _close_helpers(ops)
        keystore.close()
        message = f"FUSE mount of {mountpoint} failed: {exc}"
        if not os.path.exists("/dev/fuse"):
            message += " (/dev/fuse is missing: is the fuse module loaded?)"
        log.error("%s", message)
        report(f"ERROR {message}")
        return 1
    if "libfuse_init" in own_options:
        log.info("-o libfuse_init: %s", fuseinit.LEFT_TO_LIBFUSE)
    else:
        try:
            ops.init_flags = fuseinit.answer_init()
        except Exception as exc:
            _close_helpers(ops)
            keystore.close()
            pyfuse3.close(unmount=True)
            message = f"FUSE INIT on {mountpoint} failed: {exc}"
            log.exception("%s", message)
            report(f"ERROR {message}")
            return 1
    if ops.init_flags is not None:
        _set_read_ahead(resolved_mountpoint, read_ahead_kb, init_answered=True)
        read_ahead_kb = 0  # done: the loop need not wait for INIT to do it
    pid_fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(pid_fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    log.info("mounted %s on %s", backing, mountpoint)
    report("READY")
    if ready_fd is not None:
        os.close(ready_fd)
    unmount = True
    waiter = fuseloop.install(spin_interval=spin_us / 1e6)
    try:
        log.info("request loop: polls %d us for the next request before sleeping", spin_us)
        trio.run(_main_loop, ops, resolved_mountpoint, read_ahead_kb)
    except Exception:
        log.exception("the FUSE main loop failed")
        raise
    finally:
        fuseloop.uninstall()
        # How often the poll caught the next request before the thread slept:
        # what an operator needs to judge -o spin_us (docs/operations.md).
        log.info("request loop: %d requests taken at once, %d while polling, %d after sleeping; %d turns yielded",
                 waiter.fast - waiter.spun, waiter.spun, waiter.slow, waiter.yields)
        try:
            pyfuse3.close(unmount=unmount)
        except Exception:  # the kernel side may already be gone (fusermount3 -u)
            log.debug("pyfuse3.close", exc_info=True)
        _close_helpers(ops)
        keystore.close()
        pidfile.unlink(missing_ok=True)
        log.info("unmounted %s", mountpoint)
    return 0


def _start_prefetcher() -> Prefetcher | None:
    try:
        prefetcher = Prefetcher.start()
    except OSError as exc:  # the mount works without it, only colder
        log.warning("could not start the prefetch helper (%s); files will not be read ahead", exc)
        return None
    log.info("prefetch helper: pid %d", prefetcher.pid)
    return prefetcher


def _start_client_spinner(idle_us: int, asked: bool) -> clientspin.ClientSpinner | None:
    """The helper of kmsfs/clientspin.py, where it can help; ``asked``: -o client_spin_us was given."""
    if idle_us == 0:
        log.info("client spin off (-o client_spin_us=0): waiting clients' CPUs may halt between requests")
        return None
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        log.info("client spin off: only one CPU is allowed, and the client and the daemon share it")
        return None
    if cpus > 2 and not asked:
        log.info("client spin off: with %d CPUs it may not spin on the client's; -o client_spin_us=%d turns it on",
                 cpus, idle_us)
        return None
    try:
        spinner = clientspin.ClientSpinner.start(idle_us)
    except OSError as exc:  # the mount works without it, only with slower wake-ups
        log.warning("could not start the client spin helper (%s); waiting clients' CPUs may halt", exc)
        return None
    log.info("client spin helper: pid %d, spins up to %d us after a client's last small request",
             spinner.pid, idle_us)
    return spinner


def _start_decrypt_helper(wanted: int) -> DecryptHelper | None:
    """The helper of kmsfs/decrypthelper.py, where there is a second CPU for it."""
    if not wanted:
        log.info("decrypt helper off (-o decrypt_helper=0): the request loop decrypts every read alone")
        return None
    if len(os.sched_getaffinity(0)) < 2:
        log.info("decrypt helper off: only one CPU is allowed, so it would only take turns with the loop")
        return None
    try:
        helper = DecryptHelper.start()
    except OSError as exc:  # the mount works without it, only slower on large reads
        log.warning("could not start the decrypt helper (%s); the request loop decrypts every read alone", exc)
        return None
    log.info("decrypt helper: pid %d, decrypts part of each large read from the page cache", helper.pid)
    return helper


def _close_helpers(ops: KmsfsOperations) -> None:
    if ops.prefetcher is not None:
        ops.prefetcher.close()
        ops.prefetcher = None
    if ops.client_spinner is not None:
        spun = ops.client_spinner.cpu_seconds()
        log.info("client spin helper: woken %d times, %s of CPU time spent keeping clients' CPUs awake",
                 ops.client_spinner.wakeups, "unknown" if spun is None else f"{spun:.2f} s")
        ops.client_spinner.close()
        ops.client_spinner = None
    if ops.decrypt_helper is not None:
        helper = ops.decrypt_helper
        log.info("decrypt helper: shared %d reads, failed %d", helper.shared_reads, helper.failures)
        helper.close()
        ops.decrypt_helper = None


#: How often a mounted store checks for due rotations and expired deletion windows.
SCHEDULE_INTERVAL = 60.0
#: How often a mount looks for keys disabled through another mount or the CLI.
KEY_WATCH_INTERVAL = 0.5


async def _main_loop(ops: KmsfsOperations, mountpoint: str = "", read_ahead_kb: int = 0) -> None:
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        if mountpoint and read_ahead_kb > 0:
            nursery.start_soon(_tune_read_ahead, mountpoint, read_ahead_kb)
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(_run_schedule, ops)
        nursery.start_soon(ops.watch_key_states, KEY_WATCH_INTERVAL)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune_read_ahead(mountpoint: str, kib: int) -> None:
    await trio.to_thread.run_sync(_set_read_ahead, mountpoint, kib, abandon_on_cancel=True)


async def _run_schedule(ops: KmsfsOperations) -> None:
    interval = float(os.environ.get("KMSFS_SCHEDULE_INTERVAL", SCHEDULE_INTERVAL))
    while True:
        await trio.sleep(interval)
        try:
            done = await trio.to_thread.run_sync(ops.kms.run_due)
        except (KmsError, HsmError, StoreError, OSError) as exc:
            log.error("scheduled key work failed: %s", exc)
            continue
        except Exception:
            # Never let it end the mount: the FUSE loop runs in the same nursery.
            log.exception("scheduled key work failed unexpectedly; retrying in %.0fs", interval)
            continue
        for line in done:
            log.info("scheduled key work: %s", line)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def unmount(mountpoint: Path, timeout: float = 30.0) -> None:
    """``kmsfs umount``: flush, unmount, and wait for the daemon to finish."""
    import subprocess
    import time

    if not is_mountpoint(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    pidfile = pidfile_for(mountpoint)
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = None
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(f"fusermount3 -u {mountpoint} failed: {result.stderr.strip()}")
    # Writes reach the backing files synchronously; make them durable there too.
    os.sync()
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if not pidfile.exists():
            return
        time.sleep(0.05)
    raise MountError(f"unmounted, but the daemon (pid {pid}) has not exited after {timeout:.0f}s")
