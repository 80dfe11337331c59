"""Reads around the page cache: cachestat (kmsfs/pagecache.py), DirectStream
(kmsfs/directstream.py) and its use by CipherFile and a mount.

What must hold: a streamed read returns exactly the file's plaintext, across
chunk boundaries and in any order the kernel sends; the stream never serves
bytes older than a change made through CipherFile or behind its back; a
tampered block still fails; a file O_DIRECT cannot read is read through the
page cache; chunk buffers are reused only when nothing reads into or copies
from them; and every descriptor a stream opens is closed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from kmsfs import cipherfile, directstream, pagecache
from kmsfs.cipherfile import CipherFile, WouldBlock
from kmsfs.contentcrypt import BlockAuthError, ContentCipher
from kmsfs.directstream import DirectReadError, DirectStream
from kmsfs.format import DEFAULT_BLOCK_SIZE

from conftest import Store, backing_path, wait_for
from pagecache import PAGE, drop_cached, resident_pages

CBS = DEFAULT_BLOCK_SIZE + 28  # one page per block (format 2)
MIB = 1 << 20


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 KiB, so that a few MiB cross many chunk boundaries."""
    monkeypatch.setattr(directstream, "CHUNK", 16 * PAGE)


def _cold_file(tmp_path: Path, size: int, **kwargs) -> tuple[int, CipherFile, bytes]:
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    data = os.urandom(size)
    CipherFile(fd, cipher).write(0, data)
    drop_cached(fd)
    # Opened again: a file written during an open is read through the page cache.
    return fd, CipherFile(fd, cipher, **kwargs), data


def _read_like_the_loop(cf: CipherFile, offset: int, length: int) -> bytes:
    """As the daemon reads: on the loop without waiting, else in a worker thread."""
    try:
        return bytes(cf.read(offset, length, nowait=True))
    except WouldBlock:
        return bytes(cf.read(offset, length))


# ---------------------------------------------------------------- cachestat


def test_none_cached_tells_a_cold_range_from_a_cached_one(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(64 * PAGE))
        assert not pagecache.none_cached(fd, 0, 64 * PAGE)  # just written: cached (and dirty)
        os.fsync(fd)
        drop_cached(fd)
        assert pagecache.none_cached(fd, 0, 64 * PAGE)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly one page comes in
        os.pread(fd, 1, 40 * PAGE)
        assert not pagecache.none_cached(fd, 0, 64 * PAGE)
        assert pagecache.none_cached(fd, 0, 40 * PAGE)
        assert resident_pages(fd, 0, 40) == []  # asking brought nothing in
        assert not pagecache.none_cached(fd, 0, 0)  # an empty range is never "cold"
    finally:
        os.close(fd)


def test_without_cachestat_every_range_counts_as_cached(tmp_path, monkeypatch, caplog):
    def no_such_call(*args: object) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(pagecache, "_syscall", no_such_call)
    monkeypatch.setattr(pagecache, "_available", True)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with caplog.at_level("INFO", logger="kmsfs.pagecache"):
            assert not pagecache.none_cached(fd, 0, PAGE)
        assert pagecache._available is False
        assert "cachestat(2) is not available" in caplog.text
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the stream alone


def _stream_over(path: Path, data: bytes) -> tuple[int, DirectStream]:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    stream = DirectStream.start(fd, (st.st_mtime_ns, st.st_ctime_ns, st.st_size), 0)
    assert stream is not None
    return fd, stream


def test_a_stream_copies_any_range_across_chunks(tmp_path, small_chunks):
    data = os.urandom(40 * 16 * PAGE + 1234)  # 40 chunks and a short last one
    before = _open_fds()
    fd, stream = _stream_over(tmp_path / "f", data)
    try:
        position = 0
        for length in (1000, 16 * PAGE, 16 * PAGE + 1, 3 * 16 * PAGE - 7, 5, 50 * PAGE, 16 * PAGE):
            out = bytearray(length)
            assert stream.copy_into(position, length, memoryview(out), wait=True)
            assert out == data[position:position + length]
            position += length - 3  # the next request starts inside this one, as the kernel's do
        out = bytearray(1234)
        assert stream.copy_into(len(data) - 1234, 1234, memoryview(out), wait=True)
        assert out == data[-1234:]
    finally:
        stream.close()
        os.close(fd)
    assert directstream.stats()["running"] == 0
    assert _open_fds() == before  # the stream's own O_DIRECT descriptor is closed


def test_a_stream_follows_only_an_unchanged_file_near_its_end(tmp_path, small_chunks):
    fd, stream = _stream_over(tmp_path / "f", os.urandom(8 * 16 * PAGE))
    try:
        stream.copy_into(0, 3 * 16 * PAGE, memoryview(bytearray(3 * 16 * PAGE)), wait=True)
        stamp = stream.stamp
        assert stream.follows(3 * 16 * PAGE, stamp)
        assert stream.follows(2 * 16 * PAGE, stamp)  # a request sent out of order
        assert not stream.follows(3 * 16 * PAGE + 1, stamp)  # a jump ahead
        assert not stream.follows(0, stamp)  # a jump back
        assert not stream.follows(3 * 16 * PAGE, (stamp[0] + 1, stamp[1], stamp[2]))
        assert not stream.follows(3 * 16 * PAGE, (stamp[0], stamp[1] + 1, stamp[2]))
        assert not stream.follows(3 * 16 * PAGE, (stamp[0], stamp[1], stamp[2] - 1))
    finally:
        stream.close()
        os.close(fd)


def test_a_read_that_may_not_wait_says_so_until_its_chunk_is_read(tmp_path, small_chunks, monkeypatch):
    data = os.urandom(4 * 16 * PAGE)
    gate = threading.Event()
    real = os.preadv

    def slow(fd: int, buffers: list, position: int, *flags: int) -> int:
        gate.wait(10)
        return real(fd, buffers, position, *flags)

    fd, stream = _stream_over(tmp_path / "f", data)
    monkeypatch.setattr(directstream.os, "preadv", slow)
    try:
        out = bytearray(1000)
        assert not stream.copy_into(0, 1000, memoryview(out), wait=False)
        assert out == bytes(1000)
        gate.set()
        assert stream.copy_into(0, 1000, memoryview(out), wait=True)
        assert out == data[:1000]
    finally:
        gate.set()
        stream.close()
        os.close(fd)


@pytest.mark.parametrize("code, lasting", [(errno.EINVAL, True), (errno.EIO, False)])
def test_a_failed_chunk_read_is_an_error_for_the_caller_to_fall_back_on(tmp_path, small_chunks, monkeypatch,
                                                                       code, lasting):
    def fail(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    fd, stream = _stream_over(tmp_path / "f", os.urandom(4 * 16 * PAGE))
    monkeypatch.setattr(directstream.os, "preadv", fail)
    try:
        with pytest.raises(DirectReadError) as info:
            stream.copy_into(0, 1000, memoryview(bytearray(1000)), wait=True)
        assert info.value.lasting is lasting
    finally:
        stream.close()
        os.close(fd)


def test_a_file_that_shrank_under_a_stream_is_an_error(tmp_path, small_chunks):
    path = tmp_path / "f"
    fd, stream = _stream_over(path, os.urandom(4 * 16 * PAGE))
    try:
        os.truncate(path, 16 * PAGE + 100)
        with pytest.raises(DirectReadError, match="short"):
            stream.copy_into(16 * PAGE, 16 * PAGE, memoryview(bytearray(16 * PAGE)), wait=True)
    finally:
        stream.close()
        os.close(fd)


def test_a_closed_stream_serves_nothing(tmp_path, small_chunks):
    fd, stream = _stream_over(tmp_path / "f", os.urandom(4 * 16 * PAGE))
    stream.close()
    stream.close()  # twice is harmless
    try:
        with pytest.raises(DirectReadError, match="ended"):
            stream.copy_into(0, 10, memoryview(bytearray(10)), wait=True)
    finally:
        os.close(fd)


def test_streams_are_limited_and_a_closed_one_frees_its_place(tmp_path):
    data = os.urandom(PAGE)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    streams = []
    try:
        for _ in range(directstream.MAX_STREAMS):
            stream = DirectStream.start(fd, (0, 0, PAGE), 0)
            assert stream is not None
            streams.append(stream)
        assert DirectStream.start(fd, (0, 0, PAGE), 0) is None
        streams.pop().close()
        stream = DirectStream.start(fd, (0, 0, PAGE), 0)
        assert stream is not None
        streams.append(stream)
    finally:
        for stream in streams:
            stream.close()
        os.close(fd)
    assert directstream.stats()["running"] == 0


def test_a_file_without_o_direct_cannot_start_a_stream(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    real = os.open

    def refuse_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(directstream.os, "open", refuse_direct)
    try:
        with pytest.raises(DirectReadError) as info:
            DirectStream.start(fd, (0, 0, 1), 0)
        assert info.value.lasting
        assert directstream.stats()["running"] == 0
    finally:
        os.close(fd)


def test_a_chunk_buffer_goes_back_only_when_nothing_uses_it(monkeypatch):
    pool: list[object] = []
    monkeypatch.setattr(directstream, "_pool", pool)
    chunk = directstream._Chunk(0)
    buffer = chunk.buffer
    chunk.users = 1
    chunk.dropped = True
    chunk.recycle_if_unused()
    assert pool == []  # being copied from
    chunk.users = 0
    chunk.recycle_if_unused()
    assert pool == []  # still being read into
    chunk.fetched = True
    chunk.recycle_if_unused()
    chunk.recycle_if_unused()
    assert pool == [buffer] and chunk.buffer is None  # once, and only once


def test_buffers_are_reused_and_the_pool_stays_small(tmp_path, small_chunks):
    data = os.urandom(30 * 16 * PAGE)
    fd, stream = _stream_over(tmp_path / "f", data)
    try:
        for position in range(0, len(data), 8 * PAGE):
            stream.copy_into(position, 8 * PAGE, memoryview(bytearray(8 * PAGE)), wait=True)
    finally:
        stream.close()
        os.close(fd)
    assert directstream.wait_idle(5)
    pool = directstream._pool
    assert len(pool) <= directstream.POOL_MAX
    assert len({id(buffer) for buffer in pool}) == len(pool)


# ---------------------------------------------------------------- through CipherFile


def test_a_cold_sequential_read_goes_around_the_page_cache(tmp_path):
    fd, cf, data = _cold_file(tmp_path, 20 * MIB + 777)
    started = directstream.stats()["streams"]
    try:
        for offset in range(0, len(data), MIB):
            assert _read_like_the_loop(cf, offset, MIB) == data[offset:offset + MIB]
        assert directstream.stats()["streams"] == started + 1
        # It never went through it; the last request, of 777 bytes, is too small to.
        assert pagecache.none_cached(fd, 0, (20 * MIB // DEFAULT_BLOCK_SIZE) * CBS)
    finally:
        cf.close()
        os.close(fd)
    assert directstream.wait_idle(5) and directstream.stats()["running"] == 0


def test_reads_of_cached_files_and_random_reads_use_the_page_cache(tmp_path):
    fd, cf, data = _cold_file(tmp_path, 8 * MIB)
    started = directstream.stats()["streams"]
    try:
        assert bytes(cf.read(3 * MIB, MIB)) == data[3 * MIB:4 * MIB]  # neither at 0 nor where a read ended
        assert bytes(cf.read(5 * MIB + 10, MIB)) == data[5 * MIB + 10:6 * MIB + 10]
        os.pread(fd, len(data) + 10 * PAGE, 0)  # the whole file into the page cache
        assert bytes(cf.read(0, MIB)) == data[:MIB]
        assert bytes(cf.read(0, 100 * PAGE)) == data[:100 * PAGE]
        assert directstream.stats()["streams"] == started
    finally:
        cf.close()
        os.close(fd)


def test_a_read_that_continues_through_the_page_cache_may_start_a_stream(tmp_path):
    fd, cf, data = _cold_file(tmp_path, 8 * MIB)
    started = directstream.stats()["streams"]
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: only what is read comes in
        first_request_blocks = MIB // DEFAULT_BLOCK_SIZE + 1
        os.pread(fd, first_request_blocks * CBS, 0)  # the first request's blocks cached, and no more
        assert bytes(cf.read(0, MIB)) == data[:MIB]  # from the page cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
        assert directstream.stats()["streams"] == started
        assert bytes(cf.read(MIB, MIB)) == data[MIB:2 * MIB]  # shares a cached block; the rest is cold
        assert directstream.stats()["streams"] == started + 1
    finally:
        cf.close()
        os.close(fd)


def test_without_direct_reads_everything_goes_through_the_page_cache(tmp_path):
    fd, cf, data = _cold_file(tmp_path, 4 * MIB, direct_reads=False)
    started = directstream.stats()["streams"]
    try:
        for offset in range(0, len(data), MIB):
            assert _read_like_the_loop(cf, offset, MIB) == data[offset:offset + MIB]
        assert directstream.stats()["streams"] == started
        assert not pagecache.none_cached(fd, 0, os.fstat(fd).st_size)
    finally:
        cf.close()
        os.close(fd)


@pytest.mark.parametrize("change", ["write", "truncate"])
def test_a_change_through_the_file_ends_streams_for_this_open(tmp_path, change):
    fd, cf, data = _cold_file(tmp_path, 20 * MIB)
    expected = bytearray(data)
    try:
        assert _read_like_the_loop(cf, 0, MIB) == data[:MIB]  # the stream has read ahead past 1 MiB
        assert directstream.stats()["running"] == 1
        if change == "write":
            patch = os.urandom(5000)
            cf.write(MIB + 100, patch)
            expected[MIB + 100:MIB + 5100] = patch
        else:
            cf.truncate(3 * MIB)
            del expected[3 * MIB:]
        assert directstream.wait_idle(5)  # ended
        started = directstream.stats()["streams"]
        drop_cached(fd)
        for offset in range(MIB, len(expected), MIB):
            assert _read_like_the_loop(cf, offset, MIB) == expected[offset:offset + MIB]
        assert _read_like_the_loop(cf, 0, MIB) == expected[:MIB]
        assert directstream.stats()["streams"] == started  # none again while this open lasts
    finally:
        cf.close()
        os.close(fd)


def test_a_change_behind_the_files_back_ends_the_stream(tmp_path):
    fd, cf, data = _cold_file(tmp_path, 20 * MIB)
    other_fd = os.open(tmp_path / "f", os.O_RDWR)
    try:
        assert _read_like_the_loop(cf, 0, MIB) == data[:MIB]
        # Another writer, with the same key, changes blocks the stream has read ahead.
        other = CipherFile(other_fd, cf.cipher, direct_reads=False)
        patch = os.urandom(9000)
        other.write(MIB + 100, patch)
        expected = data[MIB:MIB + 100] + patch + data[MIB + 9100:2 * MIB]
        assert _read_like_the_loop(cf, MIB, MIB) == expected
        assert directstream.wait_idle(5)
        started = directstream.stats()["streams"]
        drop_cached(fd)
        assert _read_like_the_loop(cf, 0, MIB) == data[:MIB]
        assert directstream.stats()["streams"] == started  # it may change again: no more streams
    finally:
        cf.close()
        os.close(other_fd)
        os.close(fd)


def test_an_open_file_starts_only_so_many_streams(tmp_path):
    # A reader that keeps going back to the start would otherwise make each
    # 1 MiB request read a new stream's chunks ahead.
    fd, cf, data = _cold_file(tmp_path, 4 * MIB)
    started = directstream.stats()["streams"]
    try:
        for _ in range(cipherfile.STREAMS_PER_OPEN + 3):
            assert _read_like_the_loop(cf, 0, MIB) == data[:MIB]
            assert _read_like_the_loop(cf, 2 * MIB, MIB) == data[2 * MIB:3 * MIB]  # a jump: the stream ends
        assert directstream.stats()["streams"] == started + cipherfile.STREAMS_PER_OPEN
    finally:
        cf.close()
        os.close(fd)


def test_a_tampered_block_fails_in_a_streamed_read(tmp_path):
    fd, cf, data = _cold_file(tmp_path, 4 * MIB)
    try:
        at = 300 * CBS + 1000  # inside block 300, in the second 1 MiB request
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x01]), at)
        os.fsync(fd)
        drop_cached(fd)
        assert _read_like_the_loop(cf, 0, MIB) == data[:MIB]
        with pytest.raises(BlockAuthError) as info:
            _read_like_the_loop(cf, MIB, MIB)
        assert info.value.block_number == 300
    finally:
        cf.close()
        os.close(fd)


def test_a_streamed_read_of_a_hole_is_zeros_and_caches_nothing(tmp_path):
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    fd = os.open(tmp_path / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    CipherFile(fd, cipher).truncate(16 * MIB)
    cf = CipherFile(fd, cipher)
    try:
        drop_cached(fd)
        for offset in range(0, 8 * MIB, MIB):
            assert _read_like_the_loop(cf, offset, MIB) == bytes(MIB)
        assert resident_pages(fd, 0, 8 * MIB // PAGE) == []
    finally:
        cf.close()
        os.close(fd)


def test_when_o_direct_fails_the_file_is_read_through_the_page_cache(tmp_path, monkeypatch, caplog):
    fd, cf, data = _cold_file(tmp_path, 4 * MIB)
    real = os.preadv

    def refuse_direct(fd_: int, buffers: list, position: int, *flags: int) -> int:
        if fcntl.fcntl(fd_, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd_, buffers, position, *flags)

    monkeypatch.setattr(directstream.os, "preadv", refuse_direct)
    fallbacks = directstream.stats()["fallbacks"]
    try:
        with caplog.at_level("INFO", logger="kmsfs.cipherfile"):
            for offset in range(0, len(data), MIB):
                assert _read_like_the_loop(cf, offset, MIB) == data[offset:offset + MIB]
        assert directstream.stats()["fallbacks"] == fallbacks + 1
        assert "reading through the page cache" in caplog.text
        assert not pagecache.none_cached(fd, 0, os.fstat(fd).st_size)
    finally:
        cf.close()
        os.close(fd)


def test_concurrent_readers_of_one_file_all_read_right(tmp_path, small_chunks):
    fd, cf, data = _cold_file(tmp_path, 12 * MIB)
    errors: list[BaseException] = []

    def reader(start: int) -> None:
        try:
            for offset in range(start, len(data), MIB // 2):
                assert _read_like_the_loop(cf, offset, MIB // 2) == data[offset:offset + MIB // 2]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=reader, args=(k * 4096 * 10,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
    finally:
        cf.close()
        os.close(fd)


# ---------------------------------------------------------------- through a mount


def _mount_cold(store: Store, name: str, data: bytes, *options: str):
    m = store.mount()
    (m.path / name).write_bytes(data)
    m.unmount()
    fd = os.open(backing_path(m, name), os.O_RDONLY)
    try:
        drop_cached(fd)
    finally:
        os.close(fd)
    return store.mount(None, *options)


def test_a_mount_reads_a_cold_file_around_the_page_cache(store: Store):
    # As root the mount's readahead window is 1 MiB (kmsfs/mount.py), so
    # dd's reads arrive as 1 MiB requests; otherwise as the kernel's 128 KiB
    # ones, too small to start a stream (cipherfile.DIRECT_MIN_BLOCKS).
    large_requests = os.geteuid() == 0
    data = os.urandom(24 * MIB + 5)
    m = _mount_cold(store, "big", data)
    before = json.loads((m.path / ".kmsfs" / "status").read_bytes())["direct_read"]
    got = subprocess.run(["dd", f"if={m.path / 'big'}", "bs=1M", "status=none"], capture_output=True,
                         check=True).stdout
    assert got == data
    after = json.loads((m.path / ".kmsfs" / "status").read_bytes())["direct_read"]
    assert after["fallbacks"] == before["fallbacks"]
    fd = os.open(backing_path(m, "big"), os.O_RDONLY)
    try:
        if large_requests:
            assert after["streams"] == before["streams"] + 1
            # The kernel's first and last requests may be small; those between went around it.
            assert pagecache.none_cached(fd, 2 * MIB, 20 * MIB)
        else:
            assert after["streams"] == before["streams"]
    finally:
        os.close(fd)
    # The stream ended at the last close.
    assert wait_for(lambda: json.loads((m.path / ".kmsfs" / "status").read_bytes())["direct_read"]["running"] == 0)


def test_a_mount_with_direct_read_off_reads_through_the_page_cache(store: Store):
    data = os.urandom(8 * MIB)
    m = _mount_cold(store, "big", data, "direct_read=0")
    assert json.loads((m.path / ".kmsfs" / "status").read_bytes())["direct_read"] is None
    assert (m.path / "big").read_bytes() == data
    fd = os.open(backing_path(m, "big"), os.O_RDONLY)
    try:
        assert not pagecache.none_cached(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert "direct reads off" in m.log()
