"""Backing-store I/O for one encrypted file: plaintext offsets over ciphertext blocks.

All methods are blocking (pread/pwrite plus bulk crypto) and meant to run in a
worker thread, but for ``read(nowait=True)`` and ``write_steps``, which the
request loop itself uses because they do not wait for the disk.  The caller
serialises calls per file; the methods themselves keep no state besides the
fd and the cipher, so the backing file is always the truth (its size gives
the plaintext size).

Crash safety: every update leaves the file a valid sequence of blocks at each
step.  A write replaces whole blocks in place with one pwrite (``write_steps``
with one per step); in format 2 a block is one page, and a killed daemon's
pwrite stops only between pages, so no block is ever half written.  A
truncate into the middle of a block cuts the file at the block's start and
then writes the new last block; the block is saved in an intent record first
(kmsfs/truncation.py), so that a crash in between loses nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from . import directstream
from .contentcrypt import BlockAuthError, ContentCipher
from .decrypthelper import MIN_BLOCKS as MIN_SHARED_BLOCKS
from .decrypthelper import DecryptHelper
from .directstream import DIRECT_ALIGN, DirectReadError, DirectStream
from .format import BLOCK_OVERHEAD, ciphertext_size, plaintext_size_lenient
from .pagecache import PAGE_SIZE, all_cached, none_cached
from .truncation import TruncationJournal

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Worker threads take turns at bulk crypto (see _bulk_crypto).
_BULK_CRYPTO = threading.Lock()
_MAIN_THREAD = threading.main_thread().ident
#: Reads of at least this many blocks look for holes first (one lseek): the
#: kernel's readahead requests are that large, random small reads are not.
HOLE_CHECK_MIN_BLOCKS = 16


#: Reads of at least this many blocks (256 KiB) whose range the page cache
#: holds none of may go around it (see CipherFile._read_streamed).
DIRECT_MIN_BLOCKS = 64
#: Blocks encrypted and written per step of a write made on the request loop
#: (CipherFile.write_steps): about 0.2 ms of work, the longest other requests wait.
STEP_BLOCKS = 64
#: Streams one open file may start (see CipherFile._streams_left).
STREAMS_PER_OPEN = 8


class WouldBlock(Exception):
    """A read asked not to wait found some of its blocks outside the page cache."""


#: preadv2 RWF_NOWAIT errors that mean "this read would wait" (EAGAIN) or "this
#: file system cannot promise not to" (EOPNOTSUPP; EINVAL from kernels before 4.14).
_WOULD_WAIT = frozenset({errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL})


def _bulk_crypto(fn: Callable[..., T], *args: object) -> T:
    """Encrypt or decrypt a run of blocks, one worker thread at a time.

    AES-GCM on a 4 KiB block releases the GIL for about a microsecond, so two
    threads decrypting at once hand the GIL back and forth at every block
    (a futex wakeup each time) and get less done than one.  A worker that
    waits for this lock waits without the GIL.  Measured on 1 GiB reads from a
    warm backing cache, 5 interleaved rounds: 528 -> 600 MB/s, 13% less daemon
    CPU, half the context switches.  The trio thread never takes it: it runs
    only small requests (fs.INLINE_MAX) and must not stall behind a worker.
    """
    if threading.get_ident() == _MAIN_THREAD:
        return fn(*args)
    with _BULK_CRYPTO:
        return fn(*args)


def _first_hole(fd: int) -> int:
    """Where the backing file's first hole starts (its size if it has none); 0 if unknown."""
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError:
        return 0  # _has_hole answers for each range then


def _has_hole(fd: int, start: int, end: int) -> bool:
    """Whether the backing file has a hole in [start, end), by SEEK_HOLE.

    Moves the fd's offset, which nothing here uses (all I/O is pread/pwrite).
    """
    try:
        return os.lseek(fd, start, os.SEEK_HOLE) < end
    except OSError:
        return False  # no answer: treat it as data, as file systems without holes do


_scratch_buffers = threading.local()


def _scratch(size: int) -> memoryview:
    """A buffer of ``size`` bytes for ciphertext on its way to decryption, per thread.

    Reused from one read to the next: the ciphertext never leaves the read,
    only the plaintext it decrypts to (a buffer of its own) does.
    """
    buffer: bytearray | None = getattr(_scratch_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        _scratch_buffers.buffer = buffer
    return memoryview(buffer)[:size]


class CipherFile:
    __slots__ = ("fd", "cipher", "bs", "cbs", "journal", "decrypt_helper", "_dense_below", "_direct_ok",
                 "_stream", "_stream_lock", "_stream_hint",
                 "_streams_left")

    def __init__(self, fd: int, cipher: ContentCipher, journal: TruncationJournal | None = None,
                 decrypt_helper: DecryptHelper | None = None, direct_reads: bool = True) -> None:
        self.fd = fd
        self.cipher = cipher
        #: Shares the decryption of large reads from the page cache (kmsfs/decrypthelper.py).
        self.decrypt_helper = decrypt_helper
        self.bs = cipher.block_size
        self.cbs = cipher.ct_block_size
        #: Where truncates into a block keep their intent record; None: no crash protection.
        self.journal = journal
        #: The backing file had no hole below this offset when last asked; None:
        #: not asked yet.  A hint for speed, like every hole check here (see
        #: _may_have_hole); nothing read depends on it.
        self._dense_below: int | None = None
        #: Large reads of ranges outside the page cache may go around it
        #: (kmsfs/directstream.py): only where blocks are aligned for O_DIRECT
        #: (format 2), and until O_DIRECT fails for this file.
        self._direct_ok = direct_reads and self.cbs % DIRECT_ALIGN == 0
        self._stream: DirectStream | None = None
        self._stream_lock = threading.Lock()
        #: Where the last large read ended: a stream may start there.
        self._stream_hint = -1
        #: Streams this open file may still start.  Each reads up to 24 MiB
        #: ahead, so a reader that keeps breaking them off (jumping back to
        #: the start, say) must not make the daemon read that much per request.
        self._streams_left = STREAMS_PER_OPEN

    def close(self) -> None:
        """End the stream, if any (it closes its own descriptor); the caller closes ``fd``."""
        self.drop_stream()

    # ------------------------------------------------------------------ sizes

    def size(self) -> int:
        return plaintext_size_lenient(os.fstat(self.fd).st_size, self.bs)

    # ------------------------------------------------------------------ read

    def read(self, offset: int, length: int, *, nowait: bool = False) -> bytes | memoryview:
        """The plaintext at ``offset``: a view into the decrypted blocks, not a copy.

        pyfuse3 replies from any buffer; copying out the requested range cost
        a 1 MiB memcpy per readahead request.  1 MiB reads with the backing
        file in the page cache, 6 interleaved rounds: median 0.67 -> 0.61 ms.

        ``nowait``: raise WouldBlock instead of waiting for the disk, when any
        of the blocks is not in the page cache (preadv2 with RWF_NOWAIT, which
        still starts the kernel's readahead), or when the file system cannot
        tell.  The request loop reads inline this way and leaves disk waits
        to worker threads.

        A large read of blocks that the page cache holds none of may be
        served from a DirectStream instead (_read_streamed); with ``nowait``
        it raises WouldBlock while the stream's chunks are still being read.
        """
        st = os.fstat(self.fd)
        ct_size = st.st_size
        stamp = (st.st_mtime_ns, st.st_ctime_ns, ct_size)
        size = plaintext_size_lenient(ct_size, self.bs)
        if length > 0 and offset + length >= size and ct_size > ciphertext_size(size, self.bs):
            # The tail is too short to be a block: truncated by someone else.
            # The kernel never reads past the size stat() gave it, so every
            # read that reaches the end of the file must say so.
            raise BlockAuthError(size // self.bs, "file ends inside a block header")
        if offset >= size or length <= 0:
            return b""
        end = min(offset + length, size)
        first = offset // self.bs
        count = (end - 1) // self.bs - first + 1
        if count >= HOLE_CHECK_MIN_BLOCKS and self._may_have_hole(
                first * self.cbs, min((first + count) * self.cbs, ct_size)):
            # Reading a hole sequentially lets the backing file's readahead
            # cache its zeros in large folios (2 MiB on ext4), which every
            # later small write into them must walk: see _read_to_merge.
            # fio 4k randrw on a 256 MiB file made by truncate and read once:
            # 4.1k-4.4k read IOPS before this check, 5.2k-5.9k with it.
            with self._without_readahead():
                plain = self._read_span(first, count, ct_size, stamp, nowait)
        else:
            plain = self._read_span(first, count, ct_size, stamp, nowait)
        start = offset - first * self.bs
        return memoryview(plain)[start:start + end - offset]

    def _may_have_hole(self, start: int, end: int) -> bool:
        """Whether the backing file may have a hole in [start, end).

        The first call asks where the file's first hole is (SEEK_HOLE from 0;
        the file's end if it has none) and remembers it: a range below that
        needs no system call later.  A file written in full, as fio lays out
        its files, then costs one lseek per open instead of one per small
        write.  Holes appear only at and beyond the end of a file as kmsfs
        grows it (_extend), above that offset; a hole punched behind our back
        makes this answer wrong, which costs readahead into it, never data.
        """
        if self._dense_below is None:
            self._dense_below = _first_hole(self.fd)
        if end <= self._dense_below:
            return False
        return _has_hole(self.fd, start, end)

    def _holes_may_start_at(self, position: int) -> None:
        if self._dense_below is not None and position < self._dense_below:
            self._dense_below = position

    def _read_span(self, first: int, count: int, ct_size: int, stamp: tuple[int, int, int],
                   nowait: bool) -> bytearray | memoryview:
        if count >= DIRECT_MIN_BLOCKS and self._direct_ok:
            position = first * self.cbs
            want = min(count * self.cbs, ct_size - position)
            plain = self._read_streamed(first, want, stamp, nowait)
            self._stream_hint = position + want
            if plain is not None:
                return plain
        if nowait:
            return self._read_blocks_cached(first, count, ct_size)
        return self._read_blocks(first, count)

    def _read_streamed(self, first: int, want: int, stamp: tuple[int, int, int],
                       nowait: bool) -> bytearray | memoryview | None:
        """The ``want`` bytes of blocks from ``first`` on, decrypted, from this file's DirectStream.

        None when no stream serves this read: it neither starts the file nor
        continues where the last large read ended, or the page cache holds
        some of it, or a stream cannot be had.  Raises WouldBlock if
        ``nowait`` and its chunks are still being read.
        """
        stream = self._stream_for(first * self.cbs, want, stamp)
        if stream is None:
            return None
        helper = self.decrypt_helper if nowait else None
        buffer = helper.ciphertext_buffer(want) if helper is not None else None
        if buffer is None:
            helper = None
            buffer = _scratch(want)
        try:
            if not stream.copy_into(first * self.cbs, want, buffer, wait=not nowait):
                raise WouldBlock()
        except DirectReadError as exc:
            directstream.note_fallback()
            if exc.lasting:
                self._direct_ok = False
            log.info("backing fd %d: %s through the page cache (%s)", self.fd,
                     "reading" if exc.lasting else "this read goes", exc)
            self.drop_stream(stream)
            return None
        if helper is not None:
            return helper.decrypt(self.cipher, want, first)
        return _bulk_crypto(self.cipher.decrypt, buffer, first)

    def _stream_for(self, position: int, want: int, stamp: tuple[int, int, int]) -> DirectStream | None:
        """The stream this read continues, or a new one if it may start one."""
        with self._stream_lock:
            stream = self._stream
            if stream is not None:
                if stream.follows(position, stamp):
                    return stream
                self._stream = None
                stream.close()
                if stamp != stream.stamp:
                    # Changed behind our back while read: it may change again,
                    # and each change would throw a stream's readahead away.
                    self._direct_ok = False
                    return None
            if self._streams_left <= 0:
                return None
            # The kernel's 1 MiB requests share a block with the one before
            # (1 MiB is not a whole number of 4,068-byte blocks), which that
            # read may have brought into the page cache: only what is new counts.
            if position == 0:
                new = 0
            elif self._stream_hint - self.cbs <= position <= self._stream_hint:
                new = self._stream_hint
            else:
                return None
            if not none_cached(self.fd, new, position + want - new):
                return None
            try:
                self._stream = DirectStream.start(self.fd, stamp, position)
                if self._stream is not None:
                    self._streams_left -= 1
            except DirectReadError as exc:
                log.info("backing fd %d: reading through the page cache (%s)", self.fd, exc)
                self._direct_ok = False
            return self._stream

    def _no_more_streams(self) -> None:
        """This open file changes through us: its reads go through the page cache from now on.

        A write or truncate would end every stream (its chunks hold the old
        blocks) and leave what it wrote in the page cache anyway.
        """
        if self._direct_ok or self._stream is not None:
            self._direct_ok = False
            self.drop_stream()

    def drop_stream(self, stream: DirectStream | None = None) -> None:
        """End the stream (only if it is still ``stream``, when given): the file changed or is closing."""
        with self._stream_lock:
            current = self._stream
            if current is None or (stream is not None and current is not stream):
                return
            self._stream = None
        current.close()

    @contextmanager
    def _without_readahead(self) -> Iterator[None]:
        """No readahead on this file meanwhile (POSIX_FADV_RANDOM), then the default again.

        The advice is the open file's, shared with reads that run at the same
        time in other threads: they may lose their readahead for as long, which
        costs speed only, never what is read.
        """
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            yield
        finally:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_NORMAL)

    def _read_blocks(self, first: int, count: int) -> bytearray:
        want = count * self.cbs
        ct = os.pread(self.fd, want, first * self.cbs)
        return _bulk_crypto(self.cipher.decrypt, ct, first)

    def _read_blocks_cached(self, first: int, count: int, ct_size: int) -> bytearray | memoryview:
        """``_read_blocks`` from the page cache only; WouldBlock if that is not enough.

        A large read is decrypted partly by the decrypt helper, on the other
        CPU, when there is one and this is the thread it serves.
        """
        position = first * self.cbs
        want = min(count * self.cbs, ct_size - position)
        helper = self.decrypt_helper if count >= MIN_SHARED_BLOCKS else None
        buffer = helper.ciphertext_buffer(want) if helper is not None else None
        if buffer is None:
            helper = None
            buffer = _scratch(want)
        # Partly cached, or the file shrank meanwhile: WouldBlock, and the thread finds out.
        self._pread_cached(buffer, position, want)
        if helper is not None:
            return helper.decrypt(self.cipher, want, first)
        return _bulk_crypto(self.cipher.decrypt, buffer, first)

    def _read_block(self, number: int) -> bytearray:
        return self._read_blocks(number, 1)

    def _read_to_merge(self, first: int, count: int, ct_size: int) -> bytearray:
        """The blocks that a write covers only partly, read without readahead into holes.

        A file grown by truncate and then filled in order (fio lays out its
        files so) has a hole after each write.  Reading the next block to
        merge with would start the kernel's readahead there, which fills the
        page cache with zeros in large folios (2 MiB on Linux 6.18's ext4),
        and every later small write into such a folio walks all of its
        blocks, in the daemon's time.  fio 4k randrw, 3 alternating rounds of
        15 s: 3.1k-4.0k read IOPS and 65-78 us of system time per request
        with them, 4.1k-4.3k and 49-52 us with 4 KiB pages.  So when any of
        the blocks lies in a hole, the read goes without readahead
        (POSIX_FADV_RANDOM for its duration; the caller holds the file's
        lock, so no read of the file runs meanwhile).  Holes are only a hint
        for speed here: a wrong answer never changes what is read.
        """
        position = first * self.cbs
        end = position + count * self.cbs
        # At the end of the file readahead has nowhere to go; appends skip the check.
        if end >= ct_size or not self._may_have_hole(position, end):
            return self._read_blocks(first, count)
        with self._without_readahead():
            return self._read_blocks(first, count)

    # ------------------------------------------------------------------ write

    def write(self, offset: int, data: bytes | memoryview) -> int:
        length = len(data)
        if length == 0:
            return 0
        self._no_more_streams()
        ct_size = os.fstat(self.fd).st_size
        size = plaintext_size_lenient(ct_size, self.bs)
        if offset > size:
            self._extend(size, offset)
            size = offset
            ct_size = ciphertext_size(size, self.bs)
        bs = self.bs
        end = offset + length
        new_size = max(size, end)
        first = offset // bs
        last = (end - 1) // bs
        region_start = first * bs
        region_end = min((last + 1) * bs, new_size)
        head_partial = offset > region_start
        tail_partial = end < region_end
        if not head_partial and not tail_partial:
            ct = _bulk_crypto(self.cipher.encrypt, data, first)
        elif first == last or (head_partial and tail_partial and last == first + 1):
            # One block, or two neighbours that both keep some of what they held
            # (every aligned 4 KiB write in format 2): read and decrypted in one
            # go, the request copied over its range, encrypted in one go.
            merged = self._read_to_merge(first, last - first + 1, ct_size)
            if len(merged) < region_end - region_start:  # the write grows the block
                merged.extend(bytes(region_end - region_start - len(merged)))
            merged[offset - region_start:end - region_start] = data
            ct = _bulk_crypto(self.cipher.encrypt, merged, first)
        else:
            # Only the partial first and last blocks are merged with their old
            # content; the blocks between come straight from the request.
            view = memoryview(data)
            parts: list[bytes | bytearray | memoryview] = []
            pos = 0  # where in ``data`` the next whole block starts
            if head_partial:
                head = bytearray(bs)
                old = self._read_to_merge(first, 1, ct_size)
                head[:len(old)] = old
                pos = bs - (offset - region_start)
                head[offset - region_start:] = view[:pos]
                parts.append(head)
            tail_start = last * bs - offset  # where the last block starts in ``data``
            if tail_partial:
                tail = bytearray(region_end - last * bs)
                old = self._read_to_merge(last, 1, ct_size)
                tail[:len(old)] = old
                tail[:end - last * bs] = view[tail_start:]
                parts += [view[pos:tail_start], tail]
            else:
                parts.append(view[pos:])
            ct = _bulk_crypto(self.cipher.encrypt_parts, parts, first)
        self._pwrite_all(ct, first * self.cbs)
        return length

    def write_steps(self, offset: int, data: bytes | memoryview) -> Iterator[None] | None:
        """``write`` in steps of at most ``STEP_BLOCKS`` blocks, for the request loop itself.

        None when the write might wait for the disk: when it starts past the
        end of the file (the gap would have to be written first), or when a
        block it must merge with, or a page of the backing file that it covers
        only partly (the kernel would read the rest), is not in the page
        cache.  Otherwise an iterator that encrypts and writes one step per
        ``next``, so that the caller can answer other requests in between
        (fs.write).  Every step
        writes whole blocks, as ``write`` does.  The merges are read before
        the iterator is returned, so a None has changed nothing.  The caller
        also makes sure the kernel will not throttle the writes
        (kmsfs/dirtyroom.py).
        """
        length = len(data)
        ct_size = os.fstat(self.fd).st_size
        size = plaintext_size_lenient(ct_size, self.bs)
        if length == 0 or offset > size:
            return None
        bs, cbs = self.bs, self.cbs
        end = offset + length
        first = offset // bs
        last = (end - 1) // bs
        region_end = min((last + 1) * bs, max(size, end))
        ct_start = first * cbs
        ct_end = ct_start + ciphertext_size(region_end - first * bs, bs)
        # A pwrite that covers part of a page inside the file makes the kernel read the rest
        # of it first.  (In format 2 a block is a page, so block edges are page edges.)
        for edge in (ct_start, ct_end):
            if edge % PAGE_SIZE and edge < ct_size and not all_cached(self.fd, edge, 1):
                return None
        view = memoryview(data)
        head: bytearray | None = None
        tail: bytearray | None = None
        try:
            if offset > first * bs:
                head = self._merge_block_nowait(first, ct_size)
                head.extend(bytes(min(bs, region_end - first * bs) - len(head)))
                cut = min(end, (first + 1) * bs) - offset
                head[offset - first * bs:offset - first * bs + cut] = view[:cut]
            if end < region_end and (head is None or last > first):
                tail = self._merge_block_nowait(last, ct_size)
                tail[:end - last * bs] = view[last * bs - offset:]
        except WouldBlock:
            return None
        self._no_more_streams()
        return self._write_in_steps(first, last, head, tail, view, offset)

    def _write_in_steps(self, first: int, last: int, head: bytearray | None, tail: bytearray | None,
                        view: memoryview, offset: int) -> Iterator[None]:
        bs = self.bs
        steps: list[tuple[int, bytearray | memoryview]] = []
        if head is not None:
            steps.append((first, head))
        middle_end = last + 1 - (tail is not None)
        for block in range(first + (head is not None), middle_end, STEP_BLOCKS):
            start = block * bs - offset
            steps.append((block, view[start:start + min(STEP_BLOCKS, middle_end - block) * bs]))
        if tail is not None:
            steps.append((last, tail))
        for i, (block, plaintext) in enumerate(steps):
            if i:
                yield
            self._pwrite_all(self.cipher.encrypt(plaintext, block), block * self.cbs)

    def _merge_block_nowait(self, number: int, ct_size: int) -> bytearray:
        """A block that a write covers only partly, decrypted, from the page cache only.

        The block always holds data: write_steps merges only with blocks that
        the old plaintext reaches into.
        """
        position = number * self.cbs
        want = min(self.cbs, ct_size - position)
        buffer = bytearray(want)
        self._pread_cached(buffer, position, want)
        return self.cipher.decrypt(buffer, number)

    def _pread_cached(self, buffer: bytearray | memoryview, position: int, want: int) -> None:
        """Fill ``buffer`` from the page cache only; WouldBlock if fewer than ``want`` bytes are there."""
        try:
            got = os.preadv(self.fd, [buffer], position, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in _WOULD_WAIT:
                raise WouldBlock() from None
            raise
        if got < want:
            raise WouldBlock()

    def _pwrite_all(self, data: bytes | bytearray, position: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, position)
            view = view[written:]
            position += written

    # ------------------------------------------------------------------ truncate

    def truncate(self, new_size: int) -> None:
        self._no_more_streams()
        size = self.size()
        if new_size == size:
            ct_size = ciphertext_size(size, self.bs)
            if os.fstat(self.fd).st_size != ct_size:
                os.ftruncate(self.fd, ct_size)  # drop a damaged tail fragment
            return
        if new_size > size:
            self._extend(size, new_size)
            return
        bs = self.bs
        last, rest = divmod(new_size, bs)
        if rest == 0:
            os.ftruncate(self.fd, last * self.cbs)
            return
        kept = bytes(self._read_block(last)[:rest])
        block = bytes(self.cipher.encrypt(kept, last))
        offset = last * self.cbs
        if self.journal is None:
            os.ftruncate(self.fd, offset)
            self._pwrite_all(block, offset)
            return
        with self.journal.intent(self.fd, self.cipher.file_id, offset, block):
            os.ftruncate(self.fd, offset)
            self._pwrite_all(block, offset)

    def _extend(self, size: int, new_size: int) -> None:
        """Grow with zeros; whole zero blocks become holes in the backing file."""
        bs = self.bs
        last, rest = divmod(size, bs)
        if rest:
            # Pad the old partial last block with zeros (within the same block).
            block_end = min((last + 1) * bs, new_size)
            old = self._read_block(last)
            padded = bytes(old) + bytes(block_end - size)
            self._pwrite_all(self.cipher.encrypt(padded, last), last * self.cbs)
            size = block_end
            if size == new_size:
                return
        full, rest = divmod(new_size, bs)
        # The only place kmsfs leaves holes (writes past the end come here too).
        self._holes_may_start_at(ciphertext_size(size, bs))
        os.ftruncate(self.fd, full * self.cbs)
        if rest:
            self._pwrite_all(self.cipher.encrypt(bytes(rest), full), full * self.cbs)

    # ------------------------------------------------------------------ durability

    def fsync(self, datasync: bool) -> None:
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)


__all__ = ["CipherFile", "BlockAuthError", "BLOCK_OVERHEAD"]
