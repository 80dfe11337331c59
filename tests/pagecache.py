"""Shared by tests of the page cache: which pages of a file the kernel holds."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from kmsfs import pagecache

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(fd: int, start_page: int, count: int) -> list[int]:
    """Which of the pages [start_page, start_page + count) are in the page cache (mincore(2)).

    Asked on a mapping that is never touched: a read, even one with
    RWF_NOWAIT that is refused, would start the kernel's readahead and bring
    pages in by itself.
    """
    mapping = mmap.mmap(fd, count * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=start_page * PAGE)
    try:
        view = ctypes.c_char.from_buffer(mapping)
        try:
            vector = (ctypes.c_ubyte * count)()
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(count * PAGE), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return [start_page + i for i in range(count) if vector[i] & 1]
        finally:
            del view
    finally:
        mapping.close()


def drop_cached(fd: int) -> None:
    """Drop the file's pages from the page cache (written back first), until none is left."""
    os.fsync(fd)
    size = os.fstat(fd).st_size
    for _ in range(50):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pagecache.none_cached(fd, 0, size):
            return
    pytest.fail("the file's pages could not be dropped")
