"""The helper that keeps a waiting client's CPU awake (kmsfs/clientspin.py).

What must hold: it runs at SCHED_IDLE and nothing else (so it can only take
time a CPU would spend halted), it spins while requests come and sleeps
when they stop, the daemon wakes it, it ends when the daemon closes its pipe
or dies, and a mount with or without it serves the same bytes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import process_gone, process_state, wait_for
from kmsfs import clientspin
from kmsfs.clientspin import ClientSpinner


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])



def _sleeping_flag(spinner: ClientSpinner) -> int:
    return spinner._shared[clientspin._SLEEPING_OFFSET]


@pytest.fixture
def spinner():
    spinner = ClientSpinner.start(idle_us=2000)
    yield spinner
    if not spinner._ended:
        spinner.close()
    elif spinner._process.poll() is None:
        spinner._process.kill()
        spinner._process.wait()


def test_the_helper_runs_at_idle_priority_and_sleeps_while_no_request_comes(spinner):
    # Its first act, before it maps the shared page (it starts at normal priority).
    assert wait_for(lambda: os.sched_getscheduler(spinner.pid) == os.SCHED_IDLE)
    # No request yet: after its idle window it says so and blocks on its pipe.
    assert wait_for(lambda: _sleeping_flag(spinner) == 1)
    assert wait_for(lambda: process_state(spinner.pid) == "S")
    ticks = _cpu_ticks(spinner.pid)
    time.sleep(0.3)
    assert _cpu_ticks(spinner.pid) - ticks <= 1  # asleep, not spinning
    assert spinner.cpu_seconds() is not None and spinner.cpu_seconds() < 5


def test_a_request_wakes_the_helper_and_it_spins_while_requests_come(spinner):
    assert wait_for(lambda: _sleeping_flag(spinner) == 1)
    spinner.note_request()
    assert spinner.wakeups == 1
    assert _sleeping_flag(spinner) == 0  # cleared by the daemon before the wake-up byte
    # A request every 0.1 ms for 0.3 s (the test busy-waits between them, as a
    # daemon serving requests would be busy): the helper keeps spinning.  It
    # may go to sleep only after a pause of over 2 ms, which happens here only
    # if this test itself is preempted (a loaded machine): those are counted.
    long_pauses = 0
    start = previous = time.monotonic()
    while (now := time.monotonic()) < start + 0.3:
        long_pauses += now - previous > 0.0015
        previous = now
        spinner.note_request()
        while time.monotonic() < now + 0.0001:
            pass
    # 3,000 requests; a helper that slept between them would be woken ~3,000 times.
    assert spinner.wakeups <= 2 + long_pauses  # plus one lost race at the start (see spin())
    # Then quiet: it goes back to sleep within its idle window.
    assert wait_for(lambda: _sleeping_flag(spinner) == 1)
    assert wait_for(lambda: process_state(spinner.pid) == "S")


def test_close_ends_the_helper_also_while_it_spins(spinner):
    assert wait_for(lambda: _sleeping_flag(spinner) == 1)
    spinner.note_request()
    assert wait_for(lambda: _sleeping_flag(spinner) == 0 and process_state(spinner.pid) == "R")
    spinner.close()
    assert spinner._process.returncode == 0


def test_the_helper_ignores_ctrl_c_and_ends_when_the_daemon_dies(spinner):
    assert wait_for(lambda: os.sched_getscheduler(spinner.pid) == os.SCHED_IDLE)  # set up: signals ignored
    os.kill(spinner.pid, signal.SIGINT)
    os.kill(spinner.pid, signal.SIGHUP)
    time.sleep(0.1)
    assert spinner._process.poll() is None
    # What the kernel does when the daemon dies: its end of the pipe closes.
    os.close(spinner._wake_fd)
    spinner._ended = True
    assert spinner._process.wait(10) == 0


def test_a_helper_that_died_is_reported_once_and_requests_go_on(spinner, caplog):
    assert wait_for(lambda: _sleeping_flag(spinner) == 1)
    spinner._process.kill()
    spinner._process.wait()
    with caplog.at_level(logging.WARNING, logger="kmsfs.clientspin"):
        for _ in range(5):
            spinner.note_request()  # no exception: the request is served anyway
    assert caplog.text.count("the client spin helper") == 1 and "has ended" in caplog.text
    spinner.close()


def test_a_full_wake_up_pipe_neither_blocks_nor_fails_a_request(spinner, caplog):
    assert wait_for(lambda: _sleeping_flag(spinner) == 1)
    try:
        os.kill(spinner.pid, signal.SIGSTOP)  # it cannot drain the pipe meanwhile
        # Stopped for sure: a signal is delivered after kill(2) returns, and a
        # helper still running would read wake-ups out of the pipe being filled.
        assert wait_for(lambda: process_state(spinner.pid) == "T")
        # Fill the pipe as a long run of wake-ups would: to the last byte, since
        # a 4 KiB write is refused (atomic) while up to 4095 bytes still fit.
        for chunk in (b"\1" * 4096, b"\1"):
            while True:
                try:
                    os.write(spinner._wake_fd, chunk)
                except BlockingIOError:
                    break
        woken = spinner.wakeups
        with caplog.at_level(logging.WARNING, logger="kmsfs.clientspin"):
            for _ in range(3):
                spinner._shared[clientspin._SLEEPING_OFFSET] = 1
                spinner.note_request()  # would block, were the pipe not non-blocking
        assert spinner.wakeups == woken and not spinner._ended  # a full pipe wakes it anyway
        assert "has ended" not in caplog.text
    finally:
        os.kill(spinner.pid, signal.SIGCONT)
    spinner.close()
    assert spinner._process.returncode == 0


def test_cpu_seconds_counts_while_it_runs_and_is_none_once_it_ended(spinner):
    assert spinner.cpu_seconds() is not None and spinner.cpu_seconds() >= 0
    spinner.close()
    assert spinner.cpu_seconds() is None


def test_a_helper_that_will_not_end_is_killed_at_close(monkeypatch, caplog, spinner):
    monkeypatch.setattr(clientspin, "EXIT_TIMEOUT", 0.5)
    os.kill(spinner.pid, signal.SIGSTOP)  # stopped: it never reads the end of file
    with caplog.at_level(logging.WARNING, logger="kmsfs.clientspin"):
        spinner.close()
    assert spinner._process.returncode == -signal.SIGKILL
    assert "did not end within" in caplog.text and "killing it" in caplog.text


def test_a_helper_without_idle_priority_does_not_spin_at_all(tmp_path):
    # In the helper's own process: SCHED_IDLE refused (a seccomp filter, say).
    code = (
        "import os, sys\n"
        "def refuse(*args): raise PermissionError(1, 'Operation not permitted')\n"
        "os.sched_setscheduler = refuse\n"
        "from kmsfs import clientspin\n"
        "sys.argv = ['clientspin', '99', '2000']\n"
        "clientspin.main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == clientspin.EXIT_NO_IDLE_PRIORITY
    assert "cannot take SCHED_IDLE priority" in out.stderr and "not spinning" in out.stderr


def test_the_daemon_reports_a_helper_that_could_not_spin(monkeypatch, caplog):
    real_popen = subprocess.Popen

    def without_idle_priority(argv, **kwargs):
        code = f"import sys; sys.exit({clientspin.EXIT_NO_IDLE_PRIORITY})"
        return real_popen([sys.executable, "-c", code], **kwargs)

    monkeypatch.setattr(clientspin.subprocess, "Popen", without_idle_priority)
    spinner = ClientSpinner.start()
    spinner._process.wait(10)
    with caplog.at_level(logging.WARNING, logger="kmsfs.clientspin"):
        spinner.note_request()  # its sleeping flag was never set: nothing to wake
        spinner.close()
    assert "could not take SCHED_IDLE priority and did not spin" in caplog.text


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_helper_that_cannot_be_started_leaves_no_descriptor_open(monkeypatch):
    def refuse(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "python")

    monkeypatch.setattr(clientspin.subprocess, "Popen", refuse)
    before = _open_fds()
    with pytest.raises(FileNotFoundError):
        ClientSpinner.start()
    assert _open_fds() == before


@pytest.mark.parametrize("cpus, asked, idle_us, started, message", [
    ({0, 1}, False, 2000, True, "client spin helper: pid"),
    ({0, 1}, True, 500, True, "spins up to 500 us"),
    ({0, 1}, True, 0, False, "client spin off (-o client_spin_us=0)"),
    ({0}, True, 2000, False, "only one CPU is allowed"),
    ({0, 1, 2, 3}, False, 2000, False, "with 4 CPUs it may not spin on the client's"),
    ({0, 1, 2, 3}, True, 2000, True, "client spin helper: pid"),
])
def test_the_mount_starts_the_helper_where_it_can_help(monkeypatch, caplog, cpus, asked, idle_us, started, message):
    from kmsfs import mount

    monkeypatch.setattr(mount.os, "sched_getaffinity", lambda pid: cpus)
    with caplog.at_level(logging.INFO, logger="kmsfs.mount"):
        spinner = mount._start_client_spinner(idle_us, asked)
    try:
        assert (spinner is not None) == started
        assert message in caplog.text
    finally:
        if spinner is not None:
            spinner.close()


def test_a_mount_goes_on_without_a_helper_it_cannot_start(monkeypatch, caplog):
    from kmsfs import mount

    def refuse(idle_us: int) -> ClientSpinner:
        raise PermissionError(13, "Permission denied", "python")

    monkeypatch.setattr(mount.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(mount.clientspin.ClientSpinner, "start", staticmethod(refuse))
    with caplog.at_level(logging.WARNING, logger="kmsfs.mount"):
        assert mount._start_client_spinner(2000, False) is None
    assert "could not start the client spin helper" in caplog.text


def _helper_pid(log: str) -> int | None:
    found = re.search(r"client spin helper: pid (\d+)", log)
    return int(found[1]) if found else None


def test_a_mount_with_the_helper_serves_small_io_and_ends_it_at_unmount(store):
    m = store.mount(None, "client_spin_us=1000")
    pid = _helper_pid(m.log())
    if len(os.sched_getaffinity(0)) < 2:
        assert pid is None and "only one CPU is allowed" in m.log()
    else:
        assert pid is not None, m.log()
        assert wait_for(lambda: os.sched_getscheduler(pid) == os.SCHED_IDLE)
    # Small writes and reads at scattered offsets, checked against a model.
    model = bytearray(256 * 1024)
    path = m.path / "small-io"
    with open(path, "wb+", buffering=0) as fh:
        fh.write(model)
        for i in range(2000):
            off = (i * 7919 * 4096 + i * 13) % (len(model) - 4096)
            piece = os.urandom(1 + i % 4096)
            fh.seek(off)
            fh.write(piece)
            model[off:off + len(piece)] = piece
            fh.seek((off * 3) % (len(model) - 4096))
            assert fh.read(4096) == model[(off * 3) % (len(model) - 4096):][:4096]
    assert path.read_bytes() == model
    status = json.loads((m.path / ".kmsfs" / "status").read_bytes())["client_spin"]
    assert status == (None if pid is None else {"helper_pid": pid, "wakeups": status["wakeups"]})
    m.unmount()
    if pid is not None:
        woken = re.search(r"client spin helper: woken (\d+) times, [\d.]+ s of CPU time", m.log())
        assert woken is not None, m.log()
        assert int(woken[1]) >= 1  # asleep while the mount was idle, woken by the small requests
        assert not os.path.exists(f"/proc/{pid}"), "the helper outlived its daemon"
    # Without it, the same bytes.
    m = store.mount(None, "client_spin_us=0")
    assert "client spin off (-o client_spin_us=0)" in m.log()
    assert (m.path / "small-io").read_bytes() == model
    m.unmount()



def test_the_helper_ends_when_its_daemon_is_killed(store):
    m = store.mount(None, "client_spin_us=1000")
    pid = _helper_pid(m.log())
    if pid is None:  # nothing to end: see the test above
        assert len(os.sched_getaffinity(0)) < 2, m.log()
        m.unmount()
        return
    (m.path / "f").write_bytes(b"x" * 10000)  # small writes: it spins
    m.kill9()
    assert wait_for(lambda: process_gone(pid), 10), "the helper outlived its killed daemon"


def _asleep(pid: int) -> bool:
    """The helper sleeps in its pipe read (it set its sleeping flag first)."""
    return wait_for(lambda: process_state(pid) == "S", 10)


def _wakeups(m) -> int:
    return json.loads((m.path / ".kmsfs" / "status").read_bytes())["client_spin"]["wakeups"]


def test_metadata_requests_wake_the_helper_not_only_reads_and_writes(store):
    # A program walking a tree (ls -lR sends a GETXATTR per entry) waits on
    # requests that are neither reads nor writes; they count too (fs._fuse_op).
    m = store.mount(None, "client_spin_us=1000")
    pid = _helper_pid(m.log())
    if pid is None:  # nothing to wake: see test_a_mount_with_the_helper_serves_small_io...
        assert len(os.sched_getaffinity(0)) < 2, m.log()
        m.unmount()
        return
    (m.path / "f").write_bytes(b"x")
    assert _asleep(pid)
    before = _wakeups(m)
    time.sleep(clientspin.QUIET_AFTER_OPEN * 2)  # past the quiet time of the status file's open
    for _ in range(5):
        assert _asleep(pid)
        with pytest.raises(OSError) as raised:
            os.getxattr(m.path / "f", "user.not-there")
        assert raised.value.errno == errno.ENODATA
    assert _asleep(pid)
    # Each GETXATTR found the helper asleep and woke it.
    assert _wakeups(m) >= before + 5
    m.unmount()


def test_every_request_counts_but_those_nobody_waits_for_and_reads_and_writes():
    from kmsfs.fs import KmsfsOperations

    ops = {name for name in dir(KmsfsOperations)
           if not name.startswith("_") and hasattr(getattr(KmsfsOperations, name), "__wrapped__")}
    not_counted = {name for name in ops if getattr(getattr(KmsfsOperations, name), "_counted", True) is False}
    # FORGET has no reply and RELEASE comes after close(2) returned; READ and
    # WRITE count themselves, when small.
    # OPEN holds the count off instead (note_open).
    assert not_counted == {"forget", "release", "releasedir", "read", "write", "open"}
    assert {"lookup", "getattr", "getxattr", "readdir", "create", "unlink"} <= ops - not_counted


def _beat(spinner: ClientSpinner) -> int:
    return clientspin._BEAT.unpack_from(spinner._shared, 0)[0]


def test_an_open_holds_the_count_off_for_a_while_then_requests_count_again(spinner, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(clientspin.time, "monotonic", lambda: now[0])
    spinner.note_request()
    beat = _beat(spinner)
    spinner.note_open()
    for _ in range(3):  # within the quiet time: neither a beat nor a wake-up
        now[0] += clientspin.QUIET_AFTER_OPEN / 4
        spinner.note_request()
    assert _beat(spinner) == beat
    spinner.note_open()  # another open starts the quiet time again
    now[0] += clientspin.QUIET_AFTER_OPEN * 0.9
    spinner.note_request()
    assert _beat(spinner) == beat
    now[0] += clientspin.QUIET_AFTER_OPEN * 0.2
    spinner.note_request()
    assert _beat(spinner) == beat + 1
    assert spinner._quiet_until == 0.0  # and no clock is read for the next ones


def _open_and_ask(path) -> None:
    """An open, and a request the kernel never answers from its caches (GETXATTR), as a tree reader makes."""
    with open(path, "rb") as fh:
        with pytest.raises(OSError):
            os.getxattr(fh.fileno(), "user.none")


def test_a_mount_lets_the_helper_sleep_while_files_are_opened_one_after_another(store):
    m = store.mount(None, "client_spin_us=2000")
    status = json.loads((m.path / ".kmsfs" / "status").read_bytes())
    if status["client_spin"] is None:
        m.unmount()
        pytest.skip("the client spin helper needs two CPUs or more")
    pid = status["client_spin"]["helper_pid"]
    for i in range(20):
        (m.path / f"f{i}").write_bytes(b"x" * 100)
    # Opening files and asking each for an xattr, in a loop for 0.5 s: every
    # request comes within 5 ms of an open, so none keeps the helper awake.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        for i in range(20):
            _open_and_ask(m.path / f"f{i}")
        if process_state(pid) == "S":
            break
    assert process_state(pid) == "S"
    ticks = _cpu_ticks(pid)
    for _ in range(5):
        for i in range(20):
            _open_and_ask(m.path / f"f{i}")
    assert _cpu_ticks(pid) - ticks <= 2  # it did not spin meanwhile
    m.unmount()


def test_an_operation_notes_the_request_before_it_runs_and_without_a_helper_too():
    import trio

    from kmsfs.fs import _fuse_op, _uncounted

    class Counter:
        def __init__(self) -> None:
            self.notes = 0

        def note_request(self) -> None:
            self.notes += 1

    class Ops:
        client_spinner: Counter | None = None

        @_fuse_op
        async def waits(self) -> int:
            return self.client_spinner.notes if self.client_spinner else -1

        @_fuse_op
        @_uncounted
        async def does_not_wait(self) -> int:
            return self.client_spinner.notes if self.client_spinner else -1

    ops = Ops()
    assert trio.run(ops.waits) == -1 and trio.run(ops.does_not_wait) == -1
    ops.client_spinner = Counter()
    assert trio.run(ops.waits) == 1  # noted before the handler ran
    assert trio.run(ops.does_not_wait) == 1
    assert ops.client_spinner.notes == 1
