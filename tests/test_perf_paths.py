"""The fast paths: readahead window, reads sharing the inode lock, prefetch, no FLUSH.

Each of these exists for speed (see scripts/bench); these tests check that
they keep the results exact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.mount import (
    DECRYPT_HELPER, DECRYPT_HELPER_MAX, DIRECT_READ, DIRECT_READ_MAX, WRITE_ON_LOOP, WRITE_ON_LOOP_MAX,
    _fuse_options, _given_whole_number, _mount_device, _option_value, _split_options, _unescape_mount_path,
    _whole_number_option,
)
from pagecache import resident_pages


def test_own_options_are_split_from_fuse_options():
    fuse, own = _split_options(["ro,read_ahead_kb=512", "writeback_cache", "allow_other,spin_us=0",
                                "dek_cache=10,dek_cache_seconds=5"])
    assert fuse == {"ro", "allow_other"}
    assert own == {"read_ahead_kb=512", "writeback_cache", "spin_us=0", "dek_cache=10", "dek_cache_seconds=5"}
    assert _option_value(own, "read_ahead_kb") == "512"
    assert _option_value(own, "spin_us") == "0"
    assert _option_value(own, "writeback_cache") is None


@pytest.mark.parametrize("extra, as_root, kernel_checks", [
    (set(), True, False),  # root's mount for root alone: root passes the checks anyway
    ({"ro"}, True, False),
    ({"allow_other"}, True, True),
    ({"allow_root"}, True, True),
    ({"default_permissions"}, True, True),  # asked for
    (set(), False, True),  # a user's mount: see _kernel_checks_permissions
    ({"allow_other"}, False, True),
])
def test_default_permissions_is_left_out_only_for_root_alone(tmp_path, extra, as_root, kernel_checks):
    options = _fuse_options(tmp_path, extra, as_root)
    assert ("default_permissions" in options) == kernel_checks
    assert extra <= options and f"fsname=kmsfs:{tmp_path.resolve()}" in options


@pytest.mark.parametrize("name, default, maximum", [
    ("spin_us", 50, 10_000), ("client_spin_us", 2000, 1_000_000), ("read_ahead_kb", 1024, 1 << 20),
    ("dek_cache", 8192, 1 << 20), ("dek_cache_seconds", 300, 86_400),
])
@pytest.mark.parametrize("value, good", [
    (None, True), ("0", True), ("200", True), ("MAX", True),
    ("MAX+1", False), ("-1", False), ("fast", False), ("", False), ("1.5", False),
])
def test_whole_number_options(name, default, maximum, value, good, caplog):
    if value == "MAX":
        value = str(maximum)
    elif value == "MAX+1":
        value = str(maximum + 1)
    own = set() if value is None else {f"{name}={value}"}
    expected = default if value is None or not good else int(value)
    assert _whole_number_option(own, name, default, maximum) == expected
    # Only a good value counts as given (-o client_spin_us=N asks for the helper).
    assert _given_whole_number(own, name, default, maximum) == (None if value is None or not good else expected)
    assert (f"ignoring -o {name}={value}" in caplog.text) == (not good)


@pytest.mark.parametrize("value, expected", [
    (None, 1), ("1", 1), ("0", 0), ("2", 1), ("-1", 1), ("yes", 1), ("", 1),
])
@pytest.mark.parametrize("name, default, maximum", [
    ("decrypt_helper", DECRYPT_HELPER, DECRYPT_HELPER_MAX),
    ("direct_read", DIRECT_READ, DIRECT_READ_MAX),
    ("write_on_loop", WRITE_ON_LOOP, WRITE_ON_LOOP_MAX),
])
def test_on_off_options_are_0_or_1(value, expected, name, default, maximum, caplog):
    own = set() if value is None else {f"{name}={value}"}
    assert _whole_number_option(own, name, default, maximum) == expected
    assert (f"ignoring -o {name}={value}" in caplog.text) == (value not in (None, "0", "1"))


def test_mount_takes_spin_us_and_serves_either_way(store):
    m = store.mount(None, "spin_us=0")
    (m.path / "f").write_bytes(b"spun? no")
    assert (m.path / "f").read_bytes() == b"spun? no"
    assert "polls 0 us for the next request" in m.log()
    m.unmount()
    # Without the spin, no request can have been caught by it.
    counts = re.search(r"request loop: (\d+) requests taken at once, (\d+) while polling, (\d+) after sleeping",
                       m.log())
    assert counts is not None, m.log()
    assert int(counts[2]) == 0 and int(counts[1]) + int(counts[3]) > 0
    m = store.mount()
    assert (m.path / "f").read_bytes() == b"spun? no"
    assert "polls 50 us for the next request" in m.log()
    m.unmount()
    assert re.search(r"request loop: \d+ requests taken at once, \d+ while polling, \d+ after sleeping; "
                     r"\d+ turns yielded", m.log()), m.log()


def _open_descriptors(mount) -> int:
    return len(os.listdir(f"/proc/{mount.proc.pid}/fd"))


def test_forgotten_files_descriptors_are_all_closed_and_their_space_freed(mounted):
    """The kernel forgets each file rm -rf unlinks; closing the daemon's descriptor,
    the file's last reference, is when ext4 frees it, and a worker thread does
    that beside the loop.  Every descriptor must still be closed: none may leak,
    and the backing filesystem must get the space back."""
    base = _open_descriptors(mounted)
    tree = mounted.path / "many"
    tree.mkdir()
    data = os.urandom(256 * 1024)
    for i in range(200):
        (tree / f"f{i}").write_bytes(data)
    assert _open_descriptors(mounted) >= base + 200  # one O_PATH descriptor per file the kernel knows
    free_before = os.statvfs(mounted.store.backing).f_bfree
    shutil.rmtree(tree)
    deadline = time.monotonic() + 15
    while _open_descriptors(mounted) > base + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_descriptors(mounted) <= base + 1
    assert not (mounted.store.backing / "many").exists()
    # 200 files of 256 KiB, 52 MB: at least half of it back (other writers share the disk).
    assert (os.statvfs(mounted.store.backing).f_bfree - free_before) * os.statvfs(mounted.store.backing).f_frsize > 25e6
    # The mount goes on as before.
    (mounted.path / "after").write_bytes(b"still here")
    assert (mounted.path / "after").read_bytes() == b"still here"


def test_a_descriptor_that_will_not_close_is_reported_and_the_rest_are_closed(caplog):
    from kmsfs.fs import _close_all

    r, w = os.pipe()
    os.close(r)  # already closed: EBADF
    _close_all([r, w])
    assert "could not close the descriptor of a forgotten inode" in caplog.text
    with pytest.raises(OSError):
        os.fstat(w)  # closed despite the failure before it


_ALLOCATE_1MIB_BUFFERS = """
import resource, sys
if sys.argv[1] == "tuned":
    from kmsfs.mount import _tune_allocator
    _tune_allocator()
else:  # glibc's starting thresholds, held fixed: every 1 MiB buffer is mapped anew
    import ctypes
    from kmsfs.mount import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD
    libc = ctypes.CDLL(None)
    assert libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
replies = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # what a 1 MiB read does: ciphertext in, plaintext out and replied
    ciphertext = bytes((1 << 20) + 7000)
    plaintext = bytearray(1 << 20)
    del ciphertext
    replies.append(bytes(100))  # the reply's small objects, allocated meanwhile
    del plaintext
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_allocator_keeps_request_sized_buffers_instead_of_faulting_them_in_anew():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ALLOCATE_1MIB_BUFFERS, mode], capture_output=True,
                             text=True, check=True)
        return int(out.stdout)

    # 200 requests of 2 MiB would be 100,000 pages faulted in.
    assert faults("tuned") < 1_000
    # The control: with small thresholds the same requests are faulted in anew.
    # glibc's own default moves its thresholds as buffers come and go, so how
    # often it faults depends on the heap's history (1,800 to 250,000 seen);
    # the daemon fixes them for that reason.
    assert faults("small") > 20_000


class _NoMallopt:
    """A C library without mallopt (musl, say)."""


class _RefusingMallopt:
    @staticmethod
    def mallopt(param: int, value: int) -> int:
        return 0


@pytest.mark.parametrize("libc, message", [
    (_NoMallopt(), "no mallopt"), (_RefusingMallopt(), "mallopt refused the thresholds"),
])
def test_allocator_tuning_that_cannot_be_done_leaves_the_default_and_says_so(monkeypatch, caplog, libc, message):
    from kmsfs import mount

    monkeypatch.setattr(mount.ctypes, "CDLL", lambda name: libc)
    with caplog.at_level("DEBUG", logger="kmsfs.mount"):
        mount._tune_allocator()  # no exception: the mount goes on
    assert message in caplog.text


def test_mountinfo_paths_are_unescaped():
    assert _unescape_mount_path(r"/tmp/a\040b\011c") == "/tmp/a b\tc"
    assert _unescape_mount_path("/plain") == "/plain"


def _read_ahead_kb(path: Path) -> int:
    device = _mount_device(str(path.resolve()))
    assert device is not None
    return int(Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text())


def _wait_read_ahead(path: Path, expected: int) -> int:
    deadline = time.monotonic() + 10
    value = _read_ahead_kb(path)
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = _read_ahead_kb(path)
    return value


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may change a bdi's read_ahead_kb")
def test_read_ahead_window_is_raised_and_configurable(store):
    m = store.mount()
    assert _wait_read_ahead(m.path, 1024) == 1024
    m.unmount()
    m = store.mount(None, "read_ahead_kb=256")
    assert _wait_read_ahead(m.path, 256) == 256
    (m.path / "f").write_bytes(b"x" * 100_000)
    assert (m.path / "f").read_bytes() == b"x" * 100_000


def test_big_file_read_back_exactly(mounted):
    # Several MiB: the kernel reads it in 1 MiB readahead requests, which the
    # daemon serves side by side (shared lock).
    data = os.urandom(9 * 1024 * 1024 + 12345)
    path = mounted.path / "big"
    path.write_bytes(data)
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") if os.geteuid() == 0 else open(os.devnull, "w") as fh:
        fh.write("3")
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_reads_during_writes_never_see_a_torn_block(mounted):
    """Readers share the inode lock, writers exclude them: no read fails.

    (The kernel's page locks already keep most such reads apart; this is a
    sanity check of the shared/exclusive lock under load, not a proof.)"""
    size = 256 * 1024
    path = mounted.path / "rw"
    path.write_bytes(bytes([0]) * size)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            n = 1
            while not stop.is_set():
                os.pwrite(fd, bytes([n % 256]) * size, 0)
                n += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            os.close(fd)

    def reader() -> None:
        try:
            while not stop.is_set():
                fd = os.open(path, os.O_RDONLY)
                try:
                    # Bypass the page cache: posix_fadvise DONTNEED drops clean pages.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    data = os.pread(fd, size, 0)
                finally:
                    os.close(fd)
                assert len(data) == size
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert "ERROR" not in mounted.log(), mounted.log()[-2000:]


def test_tree_read_in_listing_order_with_prefetch(mounted):
    """Opening files in readdir order triggers prefetching; contents stay exact,
    also for entries that change or vanish between the listing and the prefetch."""
    tree = mounted.path / "tree"
    tree.mkdir()
    expected = {}
    for i in range(60):
        data = os.urandom(1000 + 997 * i)
        (tree / f"f{i:03d}").write_bytes(data)
        expected[f"f{i:03d}"] = data
    (tree / "sub").mkdir()
    os.symlink("f000", tree / "link")
    os.mkfifo(tree / "fifo")
    os.sync()
    if os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
    names = os.listdir(tree)
    # Some listed files go away or change before they are reached.
    os.unlink(tree / "f030")
    del expected["f030"]
    (tree / "f031").write_bytes(b"changed")
    expected["f031"] = b"changed"
    for name in names:
        if name in expected:
            assert (tree / name).read_bytes() == expected[name], name
    assert "ERROR" not in mounted.log(), mounted.log()[-2000:]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def _prefetch_status(mount) -> dict:
    return json.loads((mount.path / ".kmsfs" / "status").read_bytes())["prefetch"]


def _a_tree_read_in_listing_order(mount, files: int = 40) -> dict[str, bytes]:
    tree = mount.path / f"tree{time.monotonic_ns()}"
    tree.mkdir()
    expected = {}
    for i in range(files):
        expected[f"f{i:03d}"] = os.urandom(100 + 37 * i)
        (tree / f"f{i:03d}").write_bytes(expected[f"f{i:03d}"])
    for name in os.listdir(tree):
        assert (tree / name).read_bytes() == expected[name], name
    return expected


def test_the_prefetch_helper_serves_the_mount_and_ends_with_it(store):
    mount = store.mount()
    before = _prefetch_status(mount)
    helper = before["helper_pid"]
    assert isinstance(helper, int) and Path(f"/proc/{helper}").exists()
    assert int(Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[1]) == mount.proc.pid
    _a_tree_read_in_listing_order(mount)
    assert _prefetch_status(mount)["batches"] > before["batches"]
    mount.unmount()
    assert not Path(f"/proc/{helper}").exists()  # ended and reaped by the daemon
    assert "prefetch helper" in mount.log() and "ended with status" not in mount.log()


def test_a_mount_whose_prefetch_helper_died_serves_on(store):
    mount = store.mount()
    helper = _prefetch_status(mount)["helper_pid"]
    os.kill(helper, signal.SIGKILL)  # a child of the daemon, by its pid
    for _ in range(3):  # every batch after its death is dropped, and said once
        _a_tree_read_in_listing_order(mount)
    assert _prefetch_status(mount)["helper_pid"] is None
    assert mount.log().count("has ended") == 1, mount.log()[-3000:]
    mount.unmount()
    assert "ERROR" not in mount.log()


@pytest.mark.parametrize("cancelled", [False, True])
def test_descriptors_of_forgotten_inodes_are_closed_also_when_the_mount_ends_first(tmp_path, cancelled):
    """The closing worker's batch is closed by the loop itself if unmount cancels it first."""
    import trio

    from kmsfs.fs import KmsfsOperations

    fds = [os.open(tmp_path, os.O_PATH) for _ in range(3)]
    ops = types.SimpleNamespace(_closing=list(fds), _closer_running=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(KmsfsOperations._close_forgotten, ops)
            if cancelled:  # before the task first runs: its thread never starts
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert [fd for fd in fds if _is_open(fd)] == []
    assert ops._closing == [] and ops._closer_running is False


def test_close_sends_no_flush_and_reports_no_error(mounted):
    path = mounted.path / "closed"
    for i in range(5):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, b"line %d\n" % i)
        os.close(fd)  # no FLUSH handler: close must still succeed
    assert path.read_bytes() == b"".join(b"line %d\n" % i for i in range(5))


def test_each_write_through_a_write_only_descriptor_is_one_direct_request(mounted):
    """Write-only handles are served with direct_io (fs._serves_direct): each
    write(2) reaches the daemon as one request, also where it starts inside a
    page (through the cache the kernel splits it there); other handles are not."""
    path = mounted.path / "tar-like"
    before = _status(mounted)["write_requests"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i in range(5):
            assert os.write(fd, bytes([i]) * 10240) == 10240  # tar's record size
    finally:
        os.close(fd)
    after = _status(mounted)["write_requests"]
    assert (after["direct"] - before["direct"], after["cached"] - before["cached"]) == (5, 0)
    with open(path, "r+b") as fh:
        fh.write(b"x")
        fh.flush()
    assert _status(mounted)["write_requests"]["cached"] == after["cached"] + 1
    assert path.read_bytes() == b"x" + b"\0" * 10239 + b"".join(bytes([i]) * 10240 for i in range(1, 5))


def test_write_only_opens_keep_other_readers_and_mappings_coherent(mounted):
    """Before a direct write the kernel drops the pages that other descriptors
    and mappings hold of its range, and the next open keeps nothing stale."""
    path = mounted.path / "coherent"
    original = bytes(range(256)) * 80  # 20,480 bytes: five pages, six blocks
    path.write_bytes(original)
    expected = bytearray(original)
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, len(original), 0) == original
        assert resident_pages(reader, 0, 5) == [0, 1, 2, 3, 4]
        view = mmap.mmap(reader, len(original), prot=mmap.PROT_READ)
        writer = os.open(path, os.O_WRONLY)
        try:
            # A block's start, a page's interior across a block end, a page edge.
            for offset, data in ((0, b"head"), (5000, b"across a block end"), (8190, b"page edge")):
                assert view[offset:offset + len(data)] != data
                assert os.pwrite(writer, data, offset) == len(data)
                expected[offset:offset + len(data)] = data
                assert view[offset:offset + len(data)] == data  # the mapping reads the new bytes
                assert os.pread(reader, len(expected), 0) == expected
            # Growing the file, and appending, both through the write-only handle.
            assert os.pwrite(writer, b"past the end", len(expected)) == 12
            expected += b"past the end"
            appender = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                assert os.write(appender, b"appended") == 8
            finally:
                os.close(appender)
            expected += b"appended"
            assert os.fstat(reader).st_size == len(expected)
            assert os.pread(reader, len(expected) + 10, 0) == expected
        finally:
            os.close(writer)
            view.close()
    finally:
        os.close(reader)
    assert path.read_bytes() == expected  # a new open keeps nothing stale


_MODEL_PAGES = 5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["direct", "cached", "read", "map"]),
                              st.integers(0, 7 * 4096), st.integers(1, 3 * 4096)), min_size=1, max_size=30),
       seed=st.binary(min_size=8, max_size=8))
def test_direct_and_cached_writes_agree_with_readers_and_a_mapping(mounted, ops, seed):
    """Writes through a write-only handle (direct) and a read-write one (cached)
    in any order, with a reader and a mapping held open throughout: every read
    and every look through the mapping sees what a plain byte array says."""
    path = mounted.path / f"model-{seed.hex()}-{len(ops)}"
    model = bytearray(hashlib.sha256(seed).digest() * (_MODEL_PAGES * 4096 // 32))
    path.write_bytes(model)
    mapped = len(model)
    reader = os.open(path, os.O_RDONLY)
    cached = os.open(path, os.O_RDWR)
    direct = os.open(path, os.O_WRONLY)
    view = mmap.mmap(reader, mapped, prot=mmap.PROT_READ)
    try:
        for step, (kind, offset, length) in enumerate(ops):
            if kind in ("direct", "cached"):
                data = hashlib.sha256(seed + bytes([step])).digest() * (length // 32 + 1)
                data = data[:length]
                assert os.pwrite(direct if kind == "direct" else cached, data, offset) == length
                if offset > len(model):
                    model += bytes(offset - len(model))
                model[offset:offset + length] = data
            elif kind == "read":
                assert os.pread(reader, length, offset) == bytes(model[offset:offset + length]), step
            else:
                end = min(offset + length, mapped)
                assert view[min(offset, end):end] == bytes(model[min(offset, end):end]), step
    finally:
        view.close()
        for fd in (reader, cached, direct):
            os.close(fd)
    assert path.read_bytes() == model
    path.unlink()


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split(".")
    return (int(release[0]), int(release[1].split("-")[0])) >= (major, minor)


def test_init_takes_over_set_id_bits_and_turns_off_auto_inval_data(mounted):
    """kmsfs/fuseinit.py answers INIT itself: FUSE_HANDLE_KILLPRIV_V2 where the
    kernel offers it (5.11 and later), and no FUSE_AUTO_INVAL_DATA."""
    init = _status(mounted)["fuse_init"]
    assert init is not None, mounted.log()
    assert init["auto_inval_data"] is False
    assert init["handle_killpriv_v2"] is _kernel_at_least(5, 11)
    assert "FUSE INIT answered with flags" in mounted.log()
    # Own writes through the cache, then reads through a held handle: exact.
    path = mounted.path / "own"
    with open(path, "w+b") as fh:
        for i in range(50):
            fh.seek(i * 4096)
            fh.write(bytes([i]) * 4096)
            fh.seek((i // 2) * 4096)
            assert fh.read(4096) == bytes([i // 2]) * 4096


def test_libfuse_init_leaves_init_to_libfuse(store):
    m = store.mount(None, "libfuse_init")
    assert _status(m)["fuse_init"] is None
    assert "-o libfuse_init: FUSE INIT is answered with libfuse's flags" in m.log()
    (m.path / "f").write_bytes(b"libfuse's flags")
    assert (m.path / "f").read_bytes() == b"libfuse's flags"


def _status(mount) -> dict:
    return json.loads((mount.path / ".kmsfs" / "status").read_bytes())


def _hsm_calls(mount) -> dict[str, int]:
    return _status(mount)["hsm_calls"]


def test_hsm_calls_are_what_docs_operations_says(mounted):
    """Creating N files costs N wraps; opening a file that is already open, and
    reading, writing and closing it, cost no HSM call; neither does opening a
    file this mount created or opened lately (the DEK cache)."""
    n = 25
    before = _hsm_calls(mounted)
    for i in range(n):
        (mounted.path / f"f{i}").write_bytes(b"x" * (i * 1000))
    after_create = _hsm_calls(mounted)
    assert after_create["encrypt"] - before["encrypt"] == n
    assert after_create["decrypt"] == before["decrypt"]  # the creating handle keeps its DEK

    with open(mounted.path / "f3", "rb") as held:  # open after the creator closed: the DEK cache has it
        opened = _hsm_calls(mounted)
        assert opened == after_create
        for _ in range(10):  # more opens while it is open: none
            with open(mounted.path / "f3", "r+b") as again:
                again.write(b"y")
                assert again.read(10)
        assert held.read() and _hsm_calls(mounted) == opened
    assert _hsm_calls(mounted)["encrypt"] == after_create["encrypt"]
    assert _status(mounted)["dek_cache"]["hits"] >= 1


def _open_close_unwraps(mount, names: list[str], rounds: int) -> int:
    """HSM unwraps for opening and closing each file ``rounds`` times."""
    before = _hsm_calls(mount)["decrypt"]
    for _ in range(rounds):
        for name in names:
            assert (mount.path / name).read_bytes() == name.encode() * 100
    return _hsm_calls(mount)["decrypt"] - before


def test_the_dek_cache_saves_unwraps_across_opens_and_dek_cache_0_turns_it_off(store):
    names = [f"f{i}" for i in range(5)]
    m = store.mount()
    for name in names:
        (m.path / name).write_bytes(name.encode() * 100)
    assert _open_close_unwraps(m, names, 3) == 0  # created here: cached since the wrap
    assert _status(m)["dek_cache"]["entries"] >= 5
    assert "DEK cache: up to 8192 files' keys for 300 s" in m.log()
    m.unmount()

    m = store.mount()  # the cache lives in the daemon only: one unwrap per file, then none
    assert _status(m)["dek_cache"] == {"entries": 0, "hits": 0, "misses": 0}
    assert _open_close_unwraps(m, names, 3) == 5
    m.unmount()

    m = store.mount(None, "dek_cache=0")
    assert _status(m)["dek_cache"] is None
    assert _open_close_unwraps(m, names, 3) == 15  # every first open asks the HSM
    assert "DEK cache off" in m.log()
    m.unmount()

    m = store.mount(None, "dek_cache=2,dek_cache_seconds=600")
    assert _open_close_unwraps(m, names, 2) == 10  # 5 files through 2 entries: always evicted in time
    assert _status(m)["dek_cache"]["entries"] == 2
    assert "DEK cache: up to 2 files' keys for 600 s" in m.log()


def test_a_key_state_change_drops_its_cached_deks_and_a_disabled_key_refuses_them(mounted):
    from test_lifecycle import create_key, key_dir, kpath, write_ctl

    create_key(mounted, "proj")
    d = key_dir(mounted, "d", "proj")
    for i in range(3):
        (d / f"p{i}").write_bytes(b"secret %d" % i)
    (mounted.path / "other").write_bytes(b"default key")
    assert _status(mounted)["dek_cache"]["entries"] == 4

    write_ctl(kpath(mounted, "proj", "state"), "Disabled")
    assert _status(mounted)["dek_cache"]["entries"] == 1  # only the default key's file
    with pytest.raises(OSError) as refused:
        (d / "p0").read_bytes()
    assert refused.value.errno == errno.EACCES

    write_ctl(kpath(mounted, "proj", "state"), "Enabled")
    before = _hsm_calls(mounted)["decrypt"]
    assert [(d / f"p{i}").read_bytes() for i in range(3)] == [b"secret %d" % i for i in range(3)]
    assert (mounted.path / "other").read_bytes() == b"default key"
    assert _hsm_calls(mounted)["decrypt"] - before == 3  # proj's DEKs came from the HSM again


def test_node_lock_shares_reads_and_excludes_changes_in_order():
    """The lock itself, step by step (the mount test above cannot catch a broken
    lock: the kernel's page locks hide most races): readers overlap; a change
    waits for the readers in progress; readers arriving after a waiting change
    wait for it; changes exclude each other."""
    import trio
    import trio.testing

    from kmsfs.fs import NodeLock

    events: list[str] = []

    async def reader(lock: NodeLock, name: str, hold: trio.Event) -> None:
        async with lock.shared():
            events.append(f"{name} in")
            await hold.wait()
            events.append(f"{name} out")

    async def changer(lock: NodeLock, name: str, hold: trio.Event) -> None:
        async with lock:
            events.append(f"{name} in")
            await hold.wait()
            events.append(f"{name} out")

    async def main() -> None:
        lock = NodeLock()
        r1_go, r2_go, w_go, r3_go, w2_go = (trio.Event() for _ in range(5))
        async with trio.open_nursery() as nursery:
            # One task at a time: trio may run tasks started together in any order.
            nursery.start_soon(reader, lock, "r1", r1_go)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader, lock, "r2", r2_go)
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["r1 in", "r2 in"] and lock.locked()  # readers overlap
            nursery.start_soon(changer, lock, "w", w_go)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader, lock, "r3", r3_go)  # arrives after the waiting change
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["r1 in", "r2 in"]  # w waits for r1 and r2; r3 waits for w
            r1_go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert "w in" not in events  # r2 still reads
            r2_go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert events[-1] == "w in" and "r3 in" not in events
            nursery.start_soon(changer, lock, "w2", w2_go)
            await trio.testing.wait_all_tasks_blocked()
            w_go.set()
            await trio.testing.wait_all_tasks_blocked()
            # FIFO: r3 queued before w2, so it enters first, and w2 waits for it.
            assert events[-2:] == ["w out", "r3 in"] and "w2 in" not in events
            r3_go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert events[-2:] == ["r3 out", "w2 in"]
            w2_go.set()
        assert not lock.locked()

    trio.run(main)


def test_node_lock_survives_waiters_that_are_cancelled():
    """A change or a read cancelled while it waits (the kernel interrupted the
    request) leaves the lock as it was: held by its holder, then handed to the
    next waiter in order, then free."""
    import trio
    import trio.testing

    from kmsfs.fs import NodeLock

    events: list[str] = []

    async def changer(lock: NodeLock, name: str, hold: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with lock:
                events.append(f"{name} in")
                await hold.wait()
                events.append(f"{name} out")

    async def reader(lock: NodeLock, name: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with lock.shared():
                events.append(f"{name} in")

    async def main() -> None:
        lock = NodeLock()
        holder_go, w2_go = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(changer, lock, "holder", holder_go)
            await trio.testing.wait_all_tasks_blocked()
            w1 = await nursery.start(changer, lock, "w1", trio.Event())
            r1 = await nursery.start(reader, lock, "r1")
            await nursery.start(changer, lock, "w2", w2_go)
            await trio.testing.wait_all_tasks_blocked()
            w1.cancel()
            r1.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["holder in"] and lock.locked()
            holder_go.set()
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["holder in", "holder out", "w2 in"]
            w2_go.set()
        assert not lock.locked()
        async with lock:  # and it can be taken again at once
            assert lock.locked()
        assert not lock.locked()

    trio.run(main)


def test_prefetch_window_and_which_opens_were_warmed_ahead():
    """_prefetch_after, alone: the first open in a listing asks the helper for the
    next PREFETCH_FILES names and says that this file itself was not asked for
    (so its open starts its own data read); opening the files in order, each
    was asked for before its open, every name is sent once and in order, and
    the window grows to its maximum; a reader that skips ahead is not warmed."""
    from types import SimpleNamespace

    from kmsfs.fs import PREFETCH_FILES, PREFETCH_FILES_MAX, KmsfsOperations, Listing

    sent: list[list[bytes]] = []
    names = [b".", b".."] + [b"f%d" % i for i in range(300)]
    listing = Listing(7, names)
    ops = SimpleNamespace(
        prefetcher=SimpleNamespace(request=lambda fd, batch: sent.append(batch) or True),
        inodes={7: SimpleNamespace(fd=99)},
    )
    prefetch_after = KmsfsOperations._prefetch_after

    assert prefetch_after(ops, (listing, 2)) is False  # nobody warmed f0
    assert sent == [names[3:3 + PREFETCH_FILES]]
    assert all(prefetch_after(ops, (listing, index)) is True for index in range(3, 150))
    assert [name for batch in sent for name in batch] == names[3:listing.prefetched_to]
    assert listing.prefetched_to > 150 and listing.window == PREFETCH_FILES_MAX
    assert max(len(batch) for batch in sent) <= PREFETCH_FILES_MAX

    # an open far past what was sent (the reader skipped ahead): not warmed, and it refills from there
    assert prefetch_after(ops, (listing, 280)) is False
    assert sent[-1] == names[281:]

    ops.prefetcher = None  # no helper: every open counts as warmed, nothing is sent
    count = len(sent)
    assert prefetch_after(ops, (Listing(7, names), 2)) is True
    assert len(sent) == count
