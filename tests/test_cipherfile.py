"""CipherFile (kmsfs/cipherfile.py) against a bytearray, without a mount.

The write path has several shapes (whole blocks, one merged block, merged
head and tail read apart or, for neighbours, in one pread); random writes,
truncates and reads over small blocks reach all of them quickly.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs import cipherfile
from kmsfs.cipherfile import CipherFile, WouldBlock
from kmsfs.contentcrypt import BlockAuthError, ContentCipher
from kmsfs.format import BLOCK_OVERHEAD, DEFAULT_BLOCK_SIZE
from pagecache import PAGE, resident_pages

SMALL = 64  # plaintext bytes per block: many blocks per operation

operation = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 12 * SMALL), st.binary(min_size=1, max_size=5 * SMALL)),
    st.tuples(st.just("truncate"), st.integers(0, 12 * SMALL), st.just(b"")),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(operation, max_size=25))
def test_random_writes_and_truncates_match_a_bytearray(tmp_path_factory, ops):
    path: Path = tmp_path_factory.mktemp("cf") / "f"
    cipher = ContentCipher(os.urandom(32), os.urandom(16), SMALL)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        cf = CipherFile(fd, cipher)
        model = bytearray()
        for kind, offset, data in ops:
            if kind == "write":
                assert cf.write(offset, data) == len(data)
                if offset > len(model):
                    model += bytes(offset - len(model))
                model[offset:offset + len(data)] = data
            else:
                cf.truncate(offset)
                if offset > len(model):
                    model += bytes(offset - len(model))
                else:
                    del model[offset:]
            assert cf.size() == len(model)
            assert cf.read(0, len(model) + SMALL) == bytes(model)
            # What was just written is in the page cache: the loop's read gets it too.
            assert cf.read(0, len(model) + SMALL, nowait=True) == bytes(model)
        for start in range(0, len(model) + 1, 7):
            assert cf.read(start, 3 * SMALL + 5) == bytes(model[start:start + 3 * SMALL + 5])
    finally:
        os.close(fd)


@pytest.mark.parametrize("damaged", [1, 2])
def test_aligned_page_write_over_a_damaged_neighbour_is_refused(tmp_path, damaged):
    # An aligned 4 KiB write in format 2 merges two neighbouring blocks read in
    # one pread: damage in either must refuse the write and leave the file alone.
    bs = DEFAULT_BLOCK_SIZE
    cbs = bs + BLOCK_OVERHEAD
    cipher = ContentCipher(os.urandom(32), os.urandom(16), bs)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        cf = CipherFile(fd, cipher)
        cf.write(0, os.urandom(4 * bs))
        at = damaged * cbs + 100
        # Flip the byte: writing a fixed value left it unchanged 1 time in 256.
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
        before = path.read_bytes()
        with pytest.raises(BlockAuthError) as info:
            cf.write(4096, b"x" * 4096)  # bytes 4096..8191: the ends of blocks 1 and 2
        assert info.value.block_number == damaged
        assert path.read_bytes() == before
    finally:
        os.close(fd)


class _RecordingCipher:
    """Wraps a ContentCipher and notes whether the bulk-crypto lock was held."""

    def __init__(self, inner: ContentCipher) -> None:
        self._inner = inner
        self.block_size = inner.block_size
        self.ct_block_size = inner.ct_block_size
        self.file_id = inner.file_id
        self.held: list[bool] = []

    def _note(self) -> None:
        from kmsfs import cipherfile

        self.held.append(cipherfile._BULK_CRYPTO.locked())

    def encrypt(self, data, first):
        self._note()
        return self._inner.encrypt(data, first)

    def encrypt_parts(self, parts, first):
        self._note()
        return self._inner.encrypt_parts(parts, first)

    def decrypt(self, data, first):
        self._note()
        return self._inner.decrypt(data, first)


def test_worker_threads_take_turns_at_bulk_crypto_and_the_loop_thread_never_waits(tmp_path):
    import threading

    cipher = _RecordingCipher(ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        cf = CipherFile(fd, cipher)  # type: ignore[arg-type]
        data = os.urandom(3 * DEFAULT_BLOCK_SIZE + 100)

        def in_worker() -> None:
            cf.write(0, data)  # whole blocks
            cf.write(10, b"x" * DEFAULT_BLOCK_SIZE)  # merged head and tail
            assert cf.read(0, len(data))[:10] == data[:10]

        worker = threading.Thread(target=in_worker)
        worker.start()
        worker.join()
        assert cipher.held and all(cipher.held)
        cipher.held.clear()
        cf.write(0, data)  # the trio loop's own thread: small requests, no lock
        assert cf.read(0, len(data)) == data
        assert cipher.held and not any(cipher.held)
    finally:
        os.close(fd)


def _written_file(tmp_path: Path, blocks: int, direct_reads: bool = True) -> tuple[int, CipherFile, bytes]:
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    cf = CipherFile(fd, cipher, direct_reads=direct_reads)
    data = os.urandom(blocks * DEFAULT_BLOCK_SIZE - 1000)
    cf.write(0, data)
    os.fsync(fd)  # clean pages, so that the kernel can drop them
    return fd, cf, data


def _drop_until_a_nowait_read_would_block(fd: int, cf: CipherFile, length: int) -> None:
    """Drop the file's pages (fadvise DONTNEED) until a nowait read says WouldBlock.

    The kernel skips pages it cannot drop at that moment (locked, or still
    being read in by the readahead that a refused nowait read starts), and
    once it failed to drop any in a full CI run: so try a few times.
    """
    for _ in range(50):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            cf.read(0, length, nowait=True)
        except WouldBlock:
            return
        time.sleep(0.02)
    pytest.fail("a nowait read never refused, though the file's pages were dropped 50 times")


def test_nowait_read_serves_cached_blocks_and_will_not_wait_for_the_disk(tmp_path):
    # Through the page cache only; tests/test_directstream.py reads around it.
    fd, cf, data = _written_file(tmp_path, 64, direct_reads=False)
    try:
        assert cf.read(0, len(data), nowait=True) == data
        assert cf.read(5000, 70000, nowait=True) == data[5000:75000]
        assert cf.read(len(data) - 10, 4096, nowait=True) == data[-10:]  # the short last block
        _drop_until_a_nowait_read_would_block(fd, cf, len(data))
        assert cf.read(0, len(data)) == data  # a worker thread's read waits for the disk
        assert cf.read(0, len(data), nowait=True) == data  # and leaves the blocks cached
    finally:
        os.close(fd)


@pytest.mark.parametrize("code", ["EAGAIN", "EOPNOTSUPP", "EINVAL"])
def test_nowait_read_would_block_when_the_kernel_cannot_promise(tmp_path, monkeypatch, code):
    # EOPNOTSUPP: a file system without RWF_NOWAIT; EINVAL: a kernel before 4.14.
    fd, cf, data = _written_file(tmp_path, 8)
    try:
        def refuse(*args: object) -> int:
            raise OSError(getattr(errno, code), code)

        monkeypatch.setattr(cipherfile.os, "preadv", refuse)
        with pytest.raises(WouldBlock):
            cf.read(0, len(data), nowait=True)
        monkeypatch.undo()
        assert cf.read(0, len(data), nowait=True) == data
    finally:
        os.close(fd)


def test_nowait_read_passes_on_other_errors(tmp_path, monkeypatch):
    # Only "would wait" errors send the read to a worker; anything else is the caller's.
    fd, cf, data = _written_file(tmp_path, 8)
    try:
        def fail(*args: object) -> int:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(cipherfile.os, "preadv", fail)
        with pytest.raises(OSError) as info:
            cf.read(0, len(data), nowait=True)
        assert info.value.errno == errno.EIO and not isinstance(info.value, WouldBlock)
    finally:
        os.close(fd)


def test_nowait_read_of_a_partly_cached_range_would_block(tmp_path, monkeypatch):
    fd, cf, data = _written_file(tmp_path, 8)
    real_preadv = os.preadv
    try:
        def half(fd_: int, buffers: list, offset: int, flags: int = 0) -> int:
            view = memoryview(buffers[0])
            return real_preadv(fd_, [view[:len(view) // 2]], offset, flags)

        monkeypatch.setattr(cipherfile.os, "preadv", half)
        with pytest.raises(WouldBlock):
            cf.read(0, len(data), nowait=True)
    finally:
        os.close(fd)


def test_nowait_read_of_a_damaged_block_fails_like_any_read(tmp_path):
    fd, cf, data = _written_file(tmp_path, 8)
    try:
        at = 5 * (DEFAULT_BLOCK_SIZE + BLOCK_OVERHEAD) + 200
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x01]), at)
        with pytest.raises(BlockAuthError) as info:
            cf.read(0, len(data), nowait=True)
        assert info.value.block_number == 5
        assert cf.read(0, 5 * DEFAULT_BLOCK_SIZE, nowait=True) == data[:5 * DEFAULT_BLOCK_SIZE]
    finally:
        os.close(fd)


# ---------------------------------------------------------------- merge reads and holes


def _sparse_file(tmp_path: Path, mib: int, direct_reads: bool = True) -> tuple[int, CipherFile]:
    """A file of ``mib`` MiB of plaintext, grown by truncate: one hole but for its last block."""
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    fd = os.open(tmp_path / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    cf = CipherFile(fd, cipher, direct_reads=direct_reads)
    cf.truncate(mib << 20)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, cf


def _fadvise_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(advice)
        real(fd, offset, length, advice)

    monkeypatch.setattr(cipherfile.os, "posix_fadvise", record)
    return calls


def test_writes_that_fill_a_hole_in_order_read_their_neighbours_without_readahead(tmp_path, monkeypatch):
    # fio lays its files out so: truncate up, then fill in order.  Readahead
    # there would cache zero pages in large folios that each later small
    # write must walk (see CipherFile._read_to_merge).
    fd, cf = _sparse_file(tmp_path, 64)
    calls = _fadvise_calls(monkeypatch)
    try:
        start = 2048  # 8 MiB in, far from both ends
        pages = 64
        written = [os.urandom(PAGE) for _ in range(pages)]
        for i, data in enumerate(written):
            # Each aligned page merges two blocks; the second is still a hole.
            assert cf.write((start + i) * PAGE, data) == PAGE
        assert calls == [os.POSIX_FADV_RANDOM, os.POSIX_FADV_NORMAL] * pages
        # The blocks written (one page each on disk) are cached; nothing after them was read ahead.
        first = start * PAGE // DEFAULT_BLOCK_SIZE
        after = ((start + pages) * PAGE - 1) // DEFAULT_BLOCK_SIZE + 1
        assert resident_pages(fd, first, after - first) == list(range(first, after))
        assert resident_pages(fd, after + 1, 512) == []
        assert cf.read(start * PAGE, pages * PAGE) == b"".join(written)
        assert cf.read((start + pages) * PAGE, 3 * PAGE) == bytes(3 * PAGE)
    finally:
        os.close(fd)


def test_writes_that_fill_a_hole_in_order_stay_exact(tmp_path):
    fd, cf = _sparse_file(tmp_path, 2)
    try:
        expected = bytearray(2 << 20)
        for offset in range(0, 1 << 20, PAGE):
            chunk = os.urandom(PAGE)
            cf.write(offset, chunk)
            expected[offset:offset + PAGE] = chunk
        assert cf.size() == len(expected)
        assert cf.read(0, len(expected)) == expected
    finally:
        os.close(fd)


def test_merges_in_data_and_at_the_end_keep_readahead(tmp_path, monkeypatch):
    # Overwriting a file's data in order should still be read ahead; an
    # append's merge read reaches the end of the file, where there is no
    # readahead to avoid.
    fd, cf, data = _written_file(tmp_path, 64)
    calls = _fadvise_calls(monkeypatch)
    try:
        for offset in range(0, 40 * PAGE, PAGE):
            cf.write(offset, os.urandom(PAGE))
        cf.write(len(data), b"appended")
        cf.write(len(data) + 8, b"and more")
        assert calls == []
    finally:
        os.close(fd)


def _seek_hole_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.lseek

    def record(fd: int, position: int, whence: int) -> int:
        if whence == os.SEEK_HOLE:
            calls.append(position)
        return real(fd, position, whence)

    monkeypatch.setattr(cipherfile.os, "lseek", record)
    return calls


def test_merges_in_a_file_without_holes_ask_for_holes_once(tmp_path, monkeypatch):
    # fio's case: a file written in full, then small writes all over it.
    fd, cf, data = _written_file(tmp_path, 64)
    seeks = _seek_hole_calls(monkeypatch)
    try:
        expected = bytearray(data)
        for page in (3, 40, 7, 12, 55, 1):
            chunk = os.urandom(PAGE)
            cf.write(page * PAGE, chunk)
            expected[page * PAGE:(page + 1) * PAGE] = chunk
        assert seeks == [0]  # where is the first hole: the end, so none below it
        assert cf.read(0, len(expected)) == expected
    finally:
        os.close(fd)


@pytest.mark.parametrize("shrink_first", [False, True])
def test_holes_made_after_the_first_question_are_still_seen(tmp_path, monkeypatch, shrink_first):
    # The answer covers the file as it was; a truncate (down, then up) or an
    # extending write leaves holes that later merges must not read ahead into.
    fd, cf, data = _written_file(tmp_path, 64)
    try:
        cf.write(5 * PAGE, os.urandom(PAGE))  # asks once: no hole below the end
        if shrink_first:
            cf.truncate(8 * PAGE)
        cf.truncate(16 << 20)
        os.fsync(fd)
        calls = _fadvise_calls(monkeypatch)
        at = (12 if shrink_first else 200) * PAGE  # inside the hole the truncate left
        chunk = os.urandom(PAGE)
        cf.write(at, chunk)
        assert calls == [os.POSIX_FADV_RANDOM, os.POSIX_FADV_NORMAL]
        assert cf.read(at, PAGE) == chunk
        assert cf.read(at - 100, 100) == bytes(100)
    finally:
        os.close(fd)


def test_a_failed_merge_read_in_a_hole_restores_readahead(tmp_path, monkeypatch):
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    cf = CipherFile(fd, cipher)
    try:
        cf.write(0, os.urandom(2 * DEFAULT_BLOCK_SIZE))
        cf.truncate(16 << 20)  # blocks 0 and 1 are data, the rest a hole
        at = DEFAULT_BLOCK_SIZE + BLOCK_OVERHEAD + 100  # inside block 1
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x01]), at)
        calls = _fadvise_calls(monkeypatch)
        with pytest.raises(BlockAuthError) as info:
            cf.write(PAGE, os.urandom(PAGE))  # page 1 straddles blocks 1 (damaged) and 2 (hole)
        assert info.value.block_number == 1
        assert calls == [os.POSIX_FADV_RANDOM, os.POSIX_FADV_NORMAL]
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reads of holes


@pytest.mark.parametrize("nowait", [False, True])
def test_large_reads_of_a_hole_read_nothing_ahead(tmp_path, monkeypatch, nowait):
    # Reading a hole in order, as the kernel's readahead requests do, would let
    # the backing file's readahead run ahead and cache its zeros in large
    # folios, as the merge reads above would (see CipherFile.read).  Through
    # the page cache: reads around it (tests/test_directstream.py) cache nothing.
    fd, cf = _sparse_file(tmp_path, 64, direct_reads=False)
    calls = _fadvise_calls(monkeypatch)
    try:
        start, chunk, chunks = 8 << 20, 1 << 20, 8
        for k in range(chunks):
            at = start + k * chunk
            try:
                got = cf.read(at, chunk, nowait=nowait)
            except WouldBlock:
                got = cf.read(at, chunk)  # as the daemon does: the same read, allowed to wait
            assert bytes(got) == bytes(chunk)
        # Every read advised RANDOM and then NORMAL again (twice when a nowait read fell back).
        assert calls and calls == [os.POSIX_FADV_RANDOM, os.POSIX_FADV_NORMAL] * (len(calls) // 2)
        assert chunks <= len(calls) // 2 <= 2 * chunks
        first = start // DEFAULT_BLOCK_SIZE
        after = (start + chunks * chunk - 1) // DEFAULT_BLOCK_SIZE + 1
        assert resident_pages(fd, first, after - first) == list(range(first, after))
        assert resident_pages(fd, after, 2048) == []
    finally:
        os.close(fd)


def test_reads_of_data_and_small_reads_of_holes_keep_readahead(tmp_path, monkeypatch):
    fd, cf, data = _written_file(tmp_path, 512)
    sparse_fd, sparse = _sparse_file(tmp_path, 16)
    calls = _fadvise_calls(monkeypatch)
    try:
        assert cf.read(0, 1 << 20) == data[:1 << 20]
        assert cf.read(len(data) - 100_000, 1 << 20) == data[-100_000:]
        small = (cipherfile.HOLE_CHECK_MIN_BLOCKS - 1) * DEFAULT_BLOCK_SIZE
        at = 1000 * DEFAULT_BLOCK_SIZE  # a block boundary: the read covers HOLE_CHECK_MIN_BLOCKS - 1 blocks
        assert sparse.read(at, small) == bytes(small)  # random small reads: readahead is small
        assert calls == []
    finally:
        os.close(fd)
        os.close(sparse_fd)


def test_a_read_of_data_next_to_a_hole_is_exact(tmp_path):
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    cf = CipherFile(fd, cipher)
    try:
        head, tail = os.urandom(300_000), os.urandom(200_000)
        cf.write(0, head)
        cf.write(3 << 20, tail)  # a hole between them
        expected = head + bytes((3 << 20) - len(head)) + tail
        for nowait in (False, True):
            try:
                got = cf.read(0, len(expected), nowait=nowait)
            except WouldBlock:
                got = cf.read(0, len(expected))
            assert bytes(got) == expected
        assert cf.read(200_000, 200_000) == expected[200_000:400_000]
    finally:
        os.close(fd)


def test_a_file_system_without_seek_hole_reads_and_writes_as_usual(tmp_path, monkeypatch):
    # lseek(SEEK_HOLE) may fail (EINVAL where a file system has no notion of
    # holes): the file is then taken as all data, with readahead as usual.
    fd, cf = _sparse_file(tmp_path, 8)
    calls = _fadvise_calls(monkeypatch)

    def no_seek_hole(fd: int, position: int, whence: int) -> int:
        raise OSError(errno.EINVAL, "no SEEK_HOLE here")

    monkeypatch.setattr(cipherfile.os, "lseek", no_seek_hole)
    try:
        assert cf.read(1 << 20, 1 << 20) == bytes(1 << 20)
        data = os.urandom(PAGE)
        assert cf.write(3 * PAGE, data) == PAGE  # merges a hole block
        assert cf.read(3 * PAGE, PAGE) == data
        assert calls == []
    finally:
        os.close(fd)
