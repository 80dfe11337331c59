"""Large writes made on the request loop: CipherFile.write_steps, the dirty
throttle check (kmsfs/dirtyroom.py), pagecache.all_cached and a mount.

What must hold: a write in steps leaves exactly what CipherFile.write
leaves, for every shape of write; a write that might wait for the disk (a
merge block or a partly covered page outside the page cache, a gap before
the offset) is refused before anything changes; the loop writes only while
the kernel is far from throttling writers, and never under a cgroup memory
limit; and through a mount, large writes are made on the loop, read back
right, let other requests in, and ``-o write_on_loop=0`` turns it off.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs import cipherfile, dirtyroom, pagecache
from kmsfs.cipherfile import CipherFile
from kmsfs.contentcrypt import BlockAuthError, ContentCipher
from kmsfs.dirtyroom import DirtyRoom
from kmsfs.format import DEFAULT_BLOCK_SIZE

from conftest import Store
from pagecache import PAGE, drop_cached

MIB = 1 << 20
SMALL = 64


@contextmanager
def _pair(tmp_path: Path, block_size: int) -> Iterator[tuple[CipherFile, CipherFile]]:
    """Two files under one cipher: one written by write, the other by write_steps."""
    cipher = ContentCipher(os.urandom(32), os.urandom(16), block_size)
    fds = [os.open(tmp_path / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) for name in ("a", "b")]
    try:
        yield CipherFile(fds[0], cipher), CipherFile(fds[1], cipher)
    finally:
        for fd in fds:
            os.close(fd)


def _run(steps) -> int:
    count = 0
    for _ in steps:
        count += 1
    return count


# ---------------------------------------------------------------- CipherFile.write_steps

write_op = st.tuples(st.integers(0, 14 * SMALL), st.binary(min_size=1, max_size=6 * SMALL))


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(write_op, min_size=1, max_size=20), step_blocks=st.integers(1, 4))
def test_writes_in_steps_leave_what_write_leaves(tmp_path_factory, ops, step_blocks):
    with _pair(tmp_path_factory.mktemp("ws"), SMALL) as (plain, stepped), pytest.MonkeyPatch.context() as patch:
        patch.setattr(cipherfile, "STEP_BLOCKS", step_blocks)
        for offset, data in ops:
            plain.write(offset, data)
            steps = stepped.write_steps(offset, data)
            if steps is None:
                # Only a write past the end may be refused here: everything else is cached.
                assert offset > stepped.size()
                stepped.write(offset, data)
            else:
                _run(steps)
            assert stepped.size() == plain.size()
            assert stepped.read(0, plain.size() + SMALL) == plain.read(0, plain.size() + SMALL)


def test_a_large_write_takes_one_step_per_step_blocks(tmp_path):
    with _pair(tmp_path, DEFAULT_BLOCK_SIZE) as (_, cf):
        data = os.urandom(MIB)
        steps = cf.write_steps(0, data)
        assert steps is not None
        blocks = -(-MIB // DEFAULT_BLOCK_SIZE)
        assert _run(steps) == -(-blocks // cipherfile.STEP_BLOCKS) - 1  # no pause after the last
        # Unaligned, in the middle: a merged head, whole blocks, a merged tail.
        part = os.urandom(300_000)
        steps = cf.write_steps(12_345, part)
        assert steps is not None
        _run(steps)
        assert cf.read(0, MIB) == data[:12_345] + part + data[12_345 + len(part):]


def test_a_write_in_steps_does_nothing_until_the_first_step(tmp_path):
    with _pair(tmp_path, DEFAULT_BLOCK_SIZE) as (_, cf):
        steps = cf.write_steps(0, os.urandom(MIB))
        assert steps is not None
        assert os.fstat(cf.fd).st_size == 0
        del steps


def test_a_write_past_the_end_is_refused(tmp_path):
    with _pair(tmp_path, DEFAULT_BLOCK_SIZE) as (_, cf):
        cf.write(0, b"x" * 10)
        assert cf.write_steps(11, b"y" * 200_000) is None
        assert cf.size() == 10


@pytest.mark.parametrize("where", ["head", "tail"])
def test_a_merge_block_outside_the_page_cache_is_refused_and_nothing_changes(tmp_path, where):
    with _pair(tmp_path, DEFAULT_BLOCK_SIZE) as (_, cf):
        data = os.urandom(4 * MIB)
        cf.write(0, data)
        before = Path(tmp_path / "b").read_bytes()
        drop_cached(cf.fd)
        # head: starts inside a block; tail: starts on a block, ends inside one before the end.
        offset = 100 if where == "head" else 3 * DEFAULT_BLOCK_SIZE
        assert cf.write_steps(offset, os.urandom(20 * DEFAULT_BLOCK_SIZE + 7)) is None
        assert Path(tmp_path / "b").read_bytes() == before
        assert cf.read(0, 4 * MIB) == data


def test_whole_blocks_over_a_cold_file_need_no_read(tmp_path):
    # Format 2: a block is a page, so whole blocks cover whole pages.
    with _pair(tmp_path, DEFAULT_BLOCK_SIZE) as (_, cf):
        cf.write(0, os.urandom(2 * MIB))
        drop_cached(cf.fd)
        new = os.urandom(64 * DEFAULT_BLOCK_SIZE)
        steps = cf.write_steps(10 * DEFAULT_BLOCK_SIZE, new)
        assert steps is not None
        _run(steps)
        assert cf.read(10 * DEFAULT_BLOCK_SIZE, len(new)) == new


def test_a_partly_covered_page_outside_the_page_cache_is_refused(tmp_path):
    # With 64-byte blocks (92 bytes of ciphertext) block edges fall inside pages.
    with _pair(tmp_path, SMALL) as (_, cf):
        data = os.urandom(400 * SMALL)
        cf.write(0, data)
        before = Path(tmp_path / "b").read_bytes()
        drop_cached(cf.fd)
        ct_size = os.fstat(cf.fd).st_size
        assert cf.write_steps(50 * SMALL, os.urandom(100 * SMALL)) is None
        assert Path(tmp_path / "b").read_bytes() == before
        assert os.fstat(cf.fd).st_size == ct_size
        # Once those pages are cached it goes.
        cf.read(0, len(data))
        new = os.urandom(100 * SMALL)
        steps = cf.write_steps(50 * SMALL, new)
        assert steps is not None
        _run(steps)
        assert cf.read(0, len(data)) == data[:50 * SMALL] + new + data[150 * SMALL:]


def test_a_failing_pwrite_in_a_step_is_raised_from_that_step(tmp_path):
    cipher = ContentCipher(os.urandom(32), os.urandom(16), DEFAULT_BLOCK_SIZE)
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every pwrite fails with EBADF
    try:
        steps = CipherFile(fd, cipher).write_steps(0, os.urandom(3 * cipherfile.STEP_BLOCKS * DEFAULT_BLOCK_SIZE))
        assert steps is not None
        with pytest.raises(OSError) as caught:
            next(steps)
        assert caught.value.errno == errno.EBADF
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


def test_a_tampered_merge_block_fails_before_anything_is_written(tmp_path):
    with _pair(tmp_path, DEFAULT_BLOCK_SIZE) as (_, cf):
        cf.write(0, os.urandom(8 * DEFAULT_BLOCK_SIZE))
        cbs = DEFAULT_BLOCK_SIZE + 28
        block = bytearray(os.pread(cf.fd, cbs, 2 * cbs))
        block[40] ^= 1
        os.pwrite(cf.fd, bytes(block), 2 * cbs)
        before = Path(tmp_path / "b").read_bytes()
        with pytest.raises(BlockAuthError) as caught:
            cf.write_steps(2 * DEFAULT_BLOCK_SIZE + 5, os.urandom(3 * DEFAULT_BLOCK_SIZE))
        assert caught.value.block_number == 2
        assert Path(tmp_path / "b").read_bytes() == before


# ---------------------------------------------------------------- pagecache.all_cached


def test_all_cached_tells_whole_ranges(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(16 * PAGE))
        assert pagecache.all_cached(fd, 0, 16 * PAGE)
        assert pagecache.all_cached(fd, 5, 1)
        assert pagecache.all_cached(fd, 3 * PAGE + 7, 0)
        drop_cached(fd)
        assert not pagecache.all_cached(fd, 0, 1)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past the page read
        os.pread(fd, PAGE, 4 * PAGE)
        assert pagecache.all_cached(fd, 4 * PAGE + 100, 10)
        assert not pagecache.all_cached(fd, 4 * PAGE + 100, PAGE)  # runs into the next page
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the dirty throttle


def _vmstat(dirty: int, writeback: int = 0, threshold: int = 400_000, background: int = 200_000) -> str:
    return (f"nr_free_pages 1\nnr_dirty {dirty}\nnr_writeback {writeback}\n"
            f"nr_dirty_threshold {threshold}\nnr_dirty_background_threshold {background}\n")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_room_is_counted_below_the_freerun_ceiling():
    values = dirtyroom.parse_vmstat(_vmstat(dirty=1000, writeback=500))
    assert dirtyroom.room_below_freerun(values) == (300_000 - 1500) * os.sysconf("SC_PAGE_SIZE")
    assert dirtyroom.room_below_freerun(dirtyroom.parse_vmstat(_vmstat(dirty=400_000))) < 0


def test_writes_are_allowed_only_with_headroom_and_counted_until_the_next_reading():
    page = os.sysconf("SC_PAGE_SIZE")
    headroom_pages = dirtyroom.HEADROOM_BYTES // page
    state = {"text": _vmstat(dirty=300_000 - headroom_pages - (4 * MIB) // page)}
    reads = []

    def read() -> str:
        reads.append(1)
        return state["text"]

    clock = _Clock()
    room = DirtyRoom(read_vmstat=read, clock=clock, limited_by=None)
    assert room.allows(MIB) and room.allows(MIB) and room.allows(2 * MIB)
    assert not room.allows(MIB)  # our own writes used up the room; vmstat not read again yet
    assert room.refusals == 1
    count = len(reads)
    state["text"] = _vmstat(dirty=0)
    assert not room.allows(MIB)
    assert len(reads) == count
    clock.now += dirtyroom.REFRESH_SECONDS
    assert room.allows(MIB)
    assert len(reads) == count + 1
    state["text"] = _vmstat(dirty=299_000)
    clock.now += dirtyroom.REFRESH_SECONDS
    assert not room.allows(1)
    assert room.stats() == {"off_reason": None, "refusals": 3}


def test_an_unreadable_vmstat_turns_it_off(caplog):
    caplog.set_level(logging.INFO, logger="kmsfs.dirtyroom")
    def broken() -> str:
        raise PermissionError("denied")

    room = DirtyRoom(read_vmstat=broken, limited_by=None)
    assert not room.allows(1)
    assert "vmstat unreadable" in room.off_reason
    assert "large writes stay in worker threads" in caplog.text


def test_a_garbled_vmstat_later_refuses():
    texts = [_vmstat(dirty=0), "nonsense\n"]
    clock = _Clock()
    room = DirtyRoom(read_vmstat=lambda: texts[0] if clock.now == 0 else texts[1], clock=clock, limited_by=None)
    assert room.allows(MIB)
    clock.now = 1.0
    assert not room.allows(MIB)


def _cgroup_files(tmp_path: Path, mountinfo_lines: list[str], proc_lines: list[str]) -> tuple[str, str]:
    (tmp_path / "mountinfo").write_text("".join(line + "\n" for line in mountinfo_lines))
    (tmp_path / "cgroup").write_text("".join(line + "\n" for line in proc_lines))
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


def test_a_cgroup_v2_memory_limit_is_found(tmp_path):
    root = tmp_path / "cg2"
    leaf = root / "system.slice" / "kmsfs.service"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.high").write_text("max\n")
    (root / "system.slice" / "memory.max").write_text("1073741824\n")
    files = _cgroup_files(tmp_path, [f"35 23 0:30 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"],
                          ["0::/system.slice/kmsfs.service"])
    assert dirtyroom.memory_limited_cgroup(*files) == str(root / "system.slice")
    (root / "system.slice" / "memory.max").write_text("max\n")
    assert dirtyroom.memory_limited_cgroup(*files) is None
    (leaf / "memory.high").write_text("500000000\n")
    assert dirtyroom.memory_limited_cgroup(*files) == str(leaf)


def test_a_cgroup_v1_memory_limit_is_found_also_beside_v2(tmp_path):
    memory = tmp_path / "memory"
    leaf = memory / "process_api" / "job"
    leaf.mkdir(parents=True)
    unlimited = "9223372036854771712\n"
    for path in (memory, memory / "process_api", leaf):
        (path / "memory.limit_in_bytes").write_text(unlimited)
    (tmp_path / "unified").mkdir()
    files = _cgroup_files(tmp_path, [
        f"31 23 0:28 / {tmp_path} rw,relatime - tmpfs tmpfs rw,mode=755",
        f"32 31 0:29 / {tmp_path / 'cpu'} rw,relatime - cgroup cgroup rw,cpu",
        f"35 31 0:32 / {memory} rw,relatime - cgroup cgroup rw,memory",
        f"40 31 0:37 / {tmp_path / 'unified'} rw,relatime - cgroup2 cgroup2 rw",
    ], ["4:memory:/process_api/job", "1:cpu:/", "0::/"])
    assert dirtyroom.memory_limited_cgroup(*files) is None
    (memory / "process_api" / "memory.limit_in_bytes").write_text("2147483648\n")
    assert dirtyroom.memory_limited_cgroup(*files) == str(memory / "process_api")


def test_no_cgroup_mounts_means_no_limit(tmp_path):
    files = _cgroup_files(tmp_path, ["31 23 0:28 / /proc rw - proc proc rw"], ["0::/x", "4:memory:/y"])
    assert dirtyroom.memory_limited_cgroup(*files) is None
    assert dirtyroom.memory_limited_cgroup(str(tmp_path / "missing"), files[1]) is None


def test_a_memory_limit_turns_it_off():
    room = DirtyRoom(read_vmstat=lambda: _vmstat(dirty=0), limited_by="/sys/fs/cgroup/x")
    assert not room.allows(1)
    assert room.off_reason == "memory limit on cgroup /sys/fs/cgroup/x"


# ---------------------------------------------------------------- through a mount


def _status(m) -> dict:
    return json.loads((m.path / ".kmsfs" / "status").read_bytes())


def test_a_mount_makes_large_writes_on_the_loop(store: Store):
    m = store.mount()
    status = _status(m)
    if status["write_on_loop"]["off_reason"] is not None:
        pytest.skip(f"writes on the loop are off here: {status['write_on_loop']['off_reason']}")
    data = os.urandom(8 * MIB + 123)
    subprocess.run(["dd", f"of={m.path / 'big'}", "bs=1M", "iflag=fullblock", "status=none", "conv=fsync"],
                   input=data, check=True)
    after = _status(m)
    assert after["write_requests"]["on_loop"] > status["write_requests"]["on_loop"]
    assert (m.path / "big").read_bytes() == data
    # Overwrite the middle through a read-write descriptor (merged head and tail).
    patch = os.urandom(3 * MIB + 11)
    with open(m.path / "big", "r+b") as fh:
        fh.seek(1_000_001)
        fh.write(patch)
    expected = data[:1_000_001] + patch + data[1_000_001 + len(patch):]
    assert (m.path / "big").read_bytes() == expected
    m.unmount()
    m = store.mount()
    assert (m.path / "big").read_bytes() == expected


def test_other_requests_are_answered_during_a_long_write_on_the_loop(store: Store):
    m = store.mount()
    (m.path / "small").write_bytes(b"s")
    fd = os.open(m.path / "big", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        before = _status(m)["write_requests"]["on_loop"]
        # Many steps per request, and getxattr requests (never cached by the kernel) between them.
        probe = subprocess.Popen(["bash", "-c", "for i in $(seq 100); do getfattr --only-values "
                                  f"-n user.kmsfs.key {m.path / 'small'}; echo; done"],
                                 stdout=subprocess.PIPE, text=True)
        for _ in range(64):
            os.write(fd, os.urandom(MIB))
        out, _ = probe.communicate(timeout=60)
        assert probe.returncode == 0
        assert [json.loads(line)["Alias"] for line in out.splitlines()] == ["kmsfs-default"] * 100
        assert _status(m)["write_requests"]["on_loop"] > before
    finally:
        os.close(fd)


def test_a_mount_with_write_on_loop_off_uses_worker_threads(store: Store):
    m = store.mount(None, "write_on_loop=0")
    assert _status(m)["write_on_loop"] is None
    data = os.urandom(4 * MIB)
    (m.path / "big").write_bytes(data)
    assert _status(m)["write_requests"]["on_loop"] == 0
    assert (m.path / "big").read_bytes() == data
    assert "large writes on the loop off" in m.log()
