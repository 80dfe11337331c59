"""Sequential reads of a backing file that is not in the page cache: our own readahead, with O_DIRECT.

Reading a backing file through the page cache costs the reader's CPU more
than the copy suggests: the kernel's readahead allocates and inserts every
page (on these VMs, guest memory that the host must map again), and each
read then copies from pages the disk has only just filled.  Measured on the
2-CPU VM with a 1 GiB file after ``drop_caches``, read in 1 MiB pieces by one
Python thread that also encrypted each piece (as the request loop decrypts):
1.26-1.76 CPU seconds per GiB through the page cache, 0.72-0.90 with
O_DIRECT reads made ahead by another thread (3 rounds each).  The request
loop is that thread in a cold sequential read, so what it saves there the
read gains when the CPUs are scarce: docs/operations.md has the A/B rounds.

So a large read (CipherFile) of a range that the page cache holds none of,
at the start of a file or where the previous large read ended, starts a
stream: O_DIRECT reads of CHUNK bytes into reused buffers, AHEAD chunks
beyond the one being read, made by a small pool of threads.  Each request
copies its ciphertext out of the chunks (a memcpy in user space) into the
buffer it is decrypted from.

Coherence: a chunk is a copy of the backing file when it was read.  A stream
belongs to one open file and ends when this mount changes the file
(CipherFile's write and truncate), when the file's stamp (mtime, ctime,
size) moves, when reads stop following it, and at the last close.  O_DIRECT
reads write back the dirty page cache pages of their range first, so they
see every write made before them.

Memory: at most MAX_STREAMS streams at once (reads beyond them use the
page cache), each holding at most AHEAD + 2 chunks (32 MiB); POOL_MAX free
buffers are kept for the next stream.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

#: Bytes per O_DIRECT read.  A multiple of every device's logical block (DIRECT_ALIGN).
CHUNK = 8 << 20
#: Chunks read ahead of the one a request needs.  8 MiB chunks two ahead,
#: 4 MiB three or four ahead and 1 MiB six ahead were tried; the first was
#: the fastest, by a little.
AHEAD = 2
#: O_DIRECT wants offsets, lengths and buffers aligned to the device's
#: logical block; one page covers devices with 512-byte and 4 KiB blocks.
DIRECT_ALIGN = 4096
MAX_STREAMS = 3
POOL_MAX = 4
#: Threads making the O_DIRECT reads: enough for every stream's readahead
#: to be in flight together.
READERS = 4

_executor = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="kmsfs-direct")
_lock = threading.Lock()  # guards the pool, the stream count and the counters
_no_streams = threading.Condition(_lock)
_pool: list[mmap.mmap] = []
_streams = 0
counters = {"streams": 0, "chunks": 0, "fallbacks": 0}


def note_fallback() -> None:
    with _lock:
        counters["fallbacks"] += 1


def stats() -> dict[str, int]:
    """For .kmsfs/status: streams started and running, chunks read, streams that gave up."""
    with _lock:
        return {**counters, "running": _streams}


def wait_idle(timeout: float) -> bool:
    """Wait until every stream has ended and its reads are done; False on timeout."""
    with _lock:
        return _no_streams.wait_for(lambda: _streams == 0, timeout)


def _buffer() -> mmap.mmap:
    with _lock:
        while _pool:
            buffer = _pool.pop()
            if len(buffer) == CHUNK:  # always, but where tests change CHUNK
                return buffer
            buffer.close()
    return mmap.mmap(-1, CHUNK)


def _recycle(buffer: mmap.mmap) -> None:
    with _lock:
        if len(_pool) < POOL_MAX:
            _pool.append(buffer)
            return
    buffer.close()


class DirectReadError(Exception):
    """The stream cannot serve this read; read through the page cache.

    ``lasting``: O_DIRECT does not work for this file at all (EINVAL), so
    no stream should be tried for it again.
    """

    def __init__(self, why: str, lasting: bool = False) -> None:
        super().__init__(why)
        self.lasting = lasting


class _Chunk:
    __slots__ = ("index", "buffer", "done", "fetched", "got", "error", "dropped", "users")

    def __init__(self, index: int) -> None:
        self.index = index
        self.buffer: mmap.mmap | None = _buffer()
        self.done = threading.Event()
        self.fetched = False  # set under the stream's lock; ``done`` is for waiting
        self.got = 0
        self.error: OSError | None = None
        self.dropped = False  # the stream let go of it
        self.users = 0  # reads copying from it right now

    def recycle_if_unused(self) -> None:
        """Give the buffer back once nothing reads into or copies from it (under the stream's lock)."""
        if self.dropped and self.fetched and self.users == 0 and self.buffer is not None:
            _recycle(self.buffer)
            self.buffer = None


class DirectStream:
    """Chunks of one backing file read ahead with O_DIRECT; shared by the threads reading the file."""

    def __init__(self, direct_fd: int, stamp: tuple[int, int, int], position: int) -> None:
        self._direct_fd = direct_fd
        #: The backing file's (mtime, ctime, size) when the stream started.
        self.stamp = stamp
        #: Where the next read is expected to start.
        self.next_position = position
        self._chunks: dict[int, _Chunk] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False

    @classmethod
    def start(cls, fd: int, stamp: tuple[int, int, int], position: int) -> DirectStream | None:
        """A stream over the file that ``fd`` opened; None if MAX_STREAMS run already.

        Raises DirectReadError (lasting) if the file cannot be opened with O_DIRECT.
        """
        global _streams
        with _lock:
            if _streams >= MAX_STREAMS:
                return None
            _streams += 1
        try:
            # A descriptor of its own: O_DIRECT is a property of the open file,
            # and the daemon's descriptor serves buffered reads and writes.
            direct_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            with _lock:
                _streams -= 1
            raise DirectReadError(f"cannot open it with O_DIRECT: {exc}", lasting=True) from None
        with _lock:
            counters["streams"] += 1
        return cls(direct_fd, stamp, position)

    def follows(self, position: int, stamp: tuple[int, int, int]) -> bool:
        """Whether a read at ``position`` continues this stream over an unchanged file.

        The kernel may send a few readahead requests at once and in any
        order, so a read up to a chunk behind the furthest one still follows.
        """
        return stamp == self.stamp and self.next_position - CHUNK <= position <= self.next_position

    def copy_into(self, position: int, length: int, out: memoryview, wait: bool) -> bool:
        """Copy the ciphertext at [position, position + length) into ``out``.

        Starts the reads of the chunks it needs and of AHEAD more.  False
        when ``wait`` is false and a chunk is not read yet.  Raises
        DirectReadError when a chunk could not be read or came up short
        (the file shrank), or the stream was closed meanwhile.
        """
        first = position // CHUNK
        last = (position + length - 1) // CHUNK
        with self._lock:
            if self._closed:
                raise DirectReadError("the stream ended")
            for index in [index for index in self._chunks if index < first]:
                self._drop(self._chunks.pop(index))
            needed = [self._chunk(index) for index in range(first, last + 1)]
            for ahead in range(last + 1, last + 1 + AHEAD):
                if ahead * CHUNK < self.stamp[2]:  # not past the end of the file
                    self._chunk(ahead)
            self.next_position = max(self.next_position, position + length)
            if not wait and not all(chunk.done.is_set() for chunk in needed):
                return False
            for chunk in needed:
                chunk.users += 1
        try:
            self._copy(needed, position, length, out)
        finally:
            with self._lock:
                for chunk in needed:
                    chunk.users -= 1
                    chunk.recycle_if_unused()
        return True

    @staticmethod
    def _copy(chunks: list[_Chunk], position: int, length: int, out: memoryview) -> None:
        done = 0
        for chunk in chunks:
            chunk.done.wait()
            if chunk.error is not None:
                raise DirectReadError(f"O_DIRECT read failed: {chunk.error}",
                                      lasting=chunk.error.errno == errno.EINVAL)
            base = chunk.index * CHUNK
            start = max(position, base) - base
            end = min(position + length - base, CHUNK)
            if chunk.got < end:
                raise DirectReadError("a chunk came up short")
            assert chunk.buffer is not None  # in use, so not recycled
            out[done:done + end - start] = memoryview(chunk.buffer)[start:end]
            done += end - start

    def _chunk(self, index: int) -> _Chunk:
        """The chunk ``index``, its read started if it is new (under the lock)."""
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = _Chunk(index)
            self._in_flight += 1
            _executor.submit(self._fetch, chunk)
        return chunk

    def _fetch(self, chunk: _Chunk) -> None:
        try:
            assert chunk.buffer is not None  # not fetched, so not recycled
            chunk.got = os.preadv(self._direct_fd, [chunk.buffer], chunk.index * CHUNK)
        except OSError as exc:
            chunk.error = exc
        finally:
            with self._lock:
                self._in_flight -= 1
                chunk.fetched = True
                chunk.recycle_if_unused()
                last = self._closed and self._in_flight == 0
            chunk.done.set()
            with _lock:
                counters["chunks"] += 1
            if last:
                self._release()

    def _drop(self, chunk: _Chunk) -> None:
        chunk.dropped = True
        chunk.recycle_if_unused()

    def close(self) -> None:
        """End the stream.  Returns at once; reads in flight finish on their threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for chunk in self._chunks.values():
                self._drop(chunk)
            self._chunks.clear()
            last = self._in_flight == 0
        if last:
            self._release()

    def _release(self) -> None:
        """Close the descriptor once nothing reads with it (called once, after close)."""
        global _streams
        os.close(self._direct_fd)
        with _lock:
            _streams -= 1
            _no_streams.notify_all()
