"""Whether a range of a backing file is in the page cache, asked without reading it.

A read of a range that is not in the page cache can go around it (O_DIRECT,
see kmsfs/cipherfile.py); a read of a cached range must not.  Reading a
page to find out would start the kernel's readahead and fill the cache,
so this asks with cachestat(2) (Linux 6.5 and later), which only counts.
Where the kernel lacks it, every answer is "unknown" and reads take the
page cache as before.

A large write that the request loop makes itself (CipherFile.write_steps)
must not wait for a page to be read from disk either: a write that covers
only part of a page of the backing file, inside it, makes the kernel read
that page first unless it is cached, so the loop asks about those pages.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading

log = logging.getLogger(__name__)

#: cachestat's number in the unified syscall table (the same on every architecture).
_SYS_CACHESTAT = 451


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_available = True
_per_thread = threading.local()

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _buffers() -> tuple[_CachestatRange, _Cachestat]:
    buffers: tuple[_CachestatRange, _Cachestat] | None = getattr(_per_thread, "buffers", None)
    if buffers is None:
        buffers = _per_thread.buffers = (_CachestatRange(), _Cachestat())
    return buffers


def _cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of [offset, offset + length) are cached; None if the kernel cannot tell."""
    global _available
    if not _available:
        return None
    query, answer = _buffers()
    query.off = offset
    query.len = length
    if _syscall(_SYS_CACHESTAT, ctypes.c_int(fd), ctypes.byref(query), ctypes.byref(answer), 0) == 0:
        return answer.nr_cache
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that does not know it
        _available = False
        log.info("cachestat(2) is not available (%s): large reads always go through the page cache, "
                 "and large writes through worker threads",
                 errno.errorcode.get(err, err))
    return None


def none_cached(fd: int, offset: int, length: int) -> bool:
    """True if no page of [offset, offset + length) is in the page cache.

    False when some are, and when the kernel cannot tell (no cachestat, or
    a file system it does not count for): a wrong False costs only speed.
    """
    return length > 0 and _cached_pages(fd, offset, length) == 0


def all_cached(fd: int, offset: int, length: int) -> bool:
    """True if every page that holds a byte of [offset, offset + length) is in the page cache.

    False when some are not, and when the kernel cannot tell: a wrong False
    costs only speed.
    """
    if length <= 0:
        return True
    start = offset - offset % PAGE_SIZE
    pages = -(-(offset + length - start) // PAGE_SIZE)
    return _cached_pages(fd, start, pages * PAGE_SIZE) == pages
