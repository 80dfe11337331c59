"""The prefetch helper process (kmsfs/prefetch.py), without a mount.

The mount's side (files read in listing order stay exact while the helper
warms them; the helper ends with the mount) is in tests/test_perf_paths.py.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.format import HEADER_XATTR
from kmsfs.prefetch import Prefetcher, prefetch_files, serve
from pagecache import resident_pages


def _cached(fd: int) -> bool:
    """Whether the file's first page is in the page cache."""
    return resident_pages(fd, 0, 1) == [0]


def _drop_pages(fd: int) -> None:
    """Drop the file's pages; DONTNEED now and then drops nothing at the first try."""
    os.fsync(fd)
    for _ in range(50):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not _cached(fd):
            return
        time.sleep(0.05)
    pytest.fail("the file's first page stayed cached through 50 DONTNEEDs")


def _open_fds() -> set[int]:
    """This process's open descriptors, without the one that listed them (closed by now)."""
    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if is_open(fd)}


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def prefetcher() -> Iterator[Prefetcher]:
    helper = Prefetcher.start()
    try:
        yield helper
    finally:
        helper.close()


@pytest.fixture
def cold_file(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "cold"
    path.write_bytes(os.urandom(300 * 1024))
    os.setxattr(path, HEADER_XATTR, b"h" * 106)
    fd = os.open(path, os.O_RDONLY)
    try:
        _drop_pages(fd)
        yield path, fd
    finally:
        os.close(fd)


def test_the_helper_brings_the_next_files_into_the_page_cache(prefetcher, cold_file):
    path, fd = cold_file
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        assert prefetcher.request(dir_fd, [b"missing", path.name.encode()])
    finally:
        os.close(dir_fd)  # the helper has a descriptor of its own
    assert _wait_until(lambda: _cached(fd)), "the helper did not read the file ahead"
    assert prefetcher.stats()["batches"] == 1


def test_start_reading_brings_a_file_in_without_waiting_and_ignores_what_cannot_be_advised(cold_file):
    """The daemon's own read-ahead of the first file it opens in a directory."""
    from kmsfs.prefetch import start_reading

    _path, fd = cold_file
    start_reading(fd, 300 * 1024)
    assert _wait_until(lambda: _cached(fd)), "the file was not read ahead"
    read_end, write_end = os.pipe()
    try:
        start_reading(read_end)  # a pipe takes no advice (ESPIPE): nothing raised
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_helper_skips_what_is_not_a_regular_file_with_data(tmp_path):
    """Called in-process: names that vanish, links, FIFOs, directories, empty files,
    names that are no names at all.  A FIFO in particular must never be opened for reading
    (that would wait for a writer)."""
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/etc/passwd", tmp_path / "link")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "noheader").write_bytes(b"x" * 10)
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        before = _open_fds()
        prefetch_files(dir_fd, [b"gone", b"dir", b"fifo", b"link", b"empty", b"noheader", b"", b"a/b", b"../x"])
        assert _open_fds() == before  # nothing left open
    finally:
        os.close(dir_fd)


def test_header_readers_warm_every_file_and_leave_nothing_open(tmp_path):
    """With a pool of header readers (as the helper runs it): every regular
    file's data is read ahead, every descriptor is closed by the time
    prefetch_files returns, and what is not a regular file is still skipped."""
    from concurrent.futures import ThreadPoolExecutor

    fds = []
    for i in range(12):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(20 * 1024))
        os.setxattr(path, HEADER_XATTR, b"h" * 106)
        fds.append(os.open(path, os.O_RDONLY))
    os.mkfifo(tmp_path / "fifo")
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for fd in fds:
            _drop_pages(fd)
        with ThreadPoolExecutor(4) as pool:
            before = _open_fds()
            prefetch_files(dir_fd, [b"fifo", *(f"f{i}".encode() for i in range(12)), b"gone"], pool)
            assert _open_fds() == before
        assert _wait_until(lambda: all(_cached(fd) for fd in fds)), "some files were not read ahead"
    finally:
        os.close(dir_fd)
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("with_pool", [True, False])
def test_a_subdirectory_in_a_batch_has_its_first_files_warmed(tmp_path, with_pool):
    """A subdirectory named in a batch: the first SUBDIR_FILES regular files of
    its listing are warmed (in listing order, skipping what is not a regular
    file with data), the rest is left alone, and nothing stays open."""
    from concurrent.futures import ThreadPoolExecutor

    from kmsfs.prefetch import SUBDIR_FILES

    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "inner").mkdir()
    os.mkfifo(sub / "fifo")
    os.symlink("/etc/passwd", sub / "link")
    (sub / "empty").write_bytes(b"")
    for i in range(SUBDIR_FILES + 6):
        (sub / f"f{i}").write_bytes(os.urandom(8192))
    regular = [name for name in os.listdir(sub) if name[1:].isdigit()]  # f0, f1, ... in listing order
    fds = {name: os.open(sub / name, os.O_RDONLY) for name in regular}
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        for fd in fds.values():
            _drop_pages(fd)
        before = _open_fds()
        if with_pool:
            with ThreadPoolExecutor(4) as pool:
                prefetch_files(dir_fd, [b"sub"], pool)
        else:
            prefetch_files(dir_fd, [b"sub"])
        assert _open_fds() == before
        first = regular[:SUBDIR_FILES]
        assert _wait_until(lambda: all(_cached(fds[name]) for name in first)), "the first files were not read ahead"
        assert not any(_cached(fds[name]) for name in regular[SUBDIR_FILES:])
    finally:
        os.close(dir_fd)
        for fd in fds.values():
            os.close(fd)


def test_the_helper_loop_closes_every_descriptor_and_ends_at_eof(tmp_path):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    (tmp_path / "f").write_bytes(b"x" * 100)
    a = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    b = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    # What stays open at the end: exactly what was open before any of these.
    expected = _open_fds() - {ours.fileno(), theirs.fileno(), a, b}
    socket.send_fds(ours, [b"f"], [a])
    socket.send_fds(ours, [b"f"], [a, b])  # one too many: the batch is dropped
    socket.send_fds(ours, [b"f"], [])  # none: ignored
    socket.send_fds(ours, [b"f\0f"], [b])
    ours.close()
    serve(theirs)  # returns at EOF; a received descriptor it kept would be a new number here
    theirs.close()
    os.close(a)
    os.close(b)
    assert _open_fds() == expected


def test_the_helper_runs_below_the_daemons_priority(prefetcher):
    from kmsfs.prefetch import NICENESS

    def niceness(pid: int) -> int:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return int(stat_line.rsplit(")", 1)[1].split()[16])  # field 19: nice

    expected = min(niceness(os.getpid()) + NICENESS, 19)
    # (set by the helper itself once it has started)
    assert _wait_until(lambda: niceness(prefetcher.pid) == expected), niceness(prefetcher.pid)


def test_close_ends_the_helper(prefetcher):
    assert prefetcher._process.poll() is None
    prefetcher.close()
    assert prefetcher._process.returncode == 0  # ended by EOF, and reaped
    assert prefetcher.request(0, [b"x"]) is False  # after close: dropped, no error


def test_the_helper_ignores_ctrl_c_and_ends_when_the_daemon_dies(tmp_path):
    """Ctrl-C on a foreground mount reaches the helper too; it goes on until its socket closes.
    A daemon killed with SIGKILL closes it as well (the kernel does)."""
    prefetcher = Prefetcher.start()
    try:
        assert _wait_until(lambda: _signal_ignored(prefetcher.pid, signal.SIGINT))
        os.kill(prefetcher.pid, signal.SIGINT)
        time.sleep(0.2)
        assert prefetcher._process.poll() is None
    finally:
        prefetcher.close()  # EOF, as when the daemon dies
    assert prefetcher._process.returncode == 0


def _signal_ignored(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_a_helper_that_died_is_reported_once_and_the_requests_are_dropped(tmp_path, caplog):
    prefetcher = Prefetcher.start()
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        os.kill(prefetcher.pid, signal.SIGKILL)  # our own child, by its pid
        prefetcher._process.wait()
        with caplog.at_level(logging.WARNING, logger="kmsfs.prefetch"):
            assert prefetcher.request(dir_fd, [b"x"]) is False
            assert prefetcher.request(dir_fd, [b"y"]) is False
        warnings = [r for r in caplog.records if "has ended" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert str(prefetcher.pid) in warnings[0].getMessage()
        assert prefetcher.stats()["helper_pid"] is None
    finally:
        os.close(dir_fd)
        with caplog.at_level(logging.WARNING, logger="kmsfs.prefetch"):
            prefetcher.close()
    assert "ended with status -9" in caplog.text


def test_a_full_socket_drops_the_batch_without_waiting(tmp_path):
    prefetcher = Prefetcher.start()
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        os.kill(prefetcher.pid, signal.SIGSTOP)  # a helper that takes no batches
        names = [b"n" * 255] * 64
        started = time.monotonic()
        results = [prefetcher.request(dir_fd, names) for _ in range(200)]
        assert time.monotonic() - started < 5
        assert False in results and results[0] is True
        assert prefetcher.stats()["dropped"] == results.count(False)
    finally:
        os.kill(prefetcher.pid, signal.SIGCONT)
        os.close(dir_fd)
        prefetcher.close()
    assert prefetcher._process.returncode == 0


def test_a_helper_that_will_not_end_is_killed_at_close(monkeypatch, caplog):
    monkeypatch.setattr("kmsfs.prefetch.EXIT_TIMEOUT", 0.2)
    prefetcher = Prefetcher.start()
    os.kill(prefetcher.pid, signal.SIGSTOP)  # stopped: it never reads the EOF
    with caplog.at_level(logging.WARNING, logger="kmsfs.prefetch"):
        prefetcher.close()
    assert prefetcher._process.returncode == -signal.SIGKILL
    assert "did not end within" in caplog.text and "killing it" in caplog.text


def test_a_helper_that_cannot_be_started_leaves_no_socket_open(monkeypatch):
    def refuse(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "python")

    monkeypatch.setattr("kmsfs.prefetch.subprocess.Popen", refuse)
    before = _open_fds()
    with pytest.raises(FileNotFoundError):
        Prefetcher.start()
    assert _open_fds() == before


def test_a_mount_goes_on_without_a_helper_it_cannot_start(monkeypatch, caplog):
    from kmsfs import mount

    def refuse() -> Prefetcher:
        raise PermissionError(13, "Permission denied", "python")

    monkeypatch.setattr(mount.Prefetcher, "start", staticmethod(refuse))
    with caplog.at_level(logging.WARNING, logger="kmsfs.mount"):
        assert mount._start_prefetcher() is None
    assert "could not start the prefetch helper" in caplog.text
