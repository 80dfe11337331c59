"""The request loop primitives kmsfs gives pyfuse3 (kmsfs/fuseloop.py).

They skip trio's scheduler while requests are queued; these tests check that
they keep pyfuse3's contract: one waiter at a time, no request missed, and
other tasks (timers, finished worker threads) still get to run.  Every mount
in the rest of the suite runs on them too.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pyfuse3
import pytest
import trio
import trio.testing

from kmsfs import fuseloop


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


class _Ticker:
    """A task that counts its turns: shows that the loop lets other tasks run."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.ticks += 1


async def _after(delay: float, action: Callable[[], object]) -> None:
    await trio.sleep(delay)
    action()


def test_free_read_lock_is_taken_without_a_checkpoint():
    async def main() -> None:
        lock = fuseloop.ReadLock()
        with trio.testing.assert_no_checkpoints():
            async with lock:
                assert lock.locked()
        assert not lock.locked()

    trio.run(main)


def test_read_lock_excludes_and_wakes_a_waiter():
    async def main() -> None:
        lock = fuseloop.ReadLock()
        inside = 0
        most = 0
        order: list[str] = []

        async def worker(name: str) -> None:
            nonlocal inside, most
            async with lock:
                inside += 1
                most = max(most, inside)
                order.append(name)
                await trio.sleep(0.01)  # holds the lock across a real wait
                inside -= 1

        async with trio.open_nursery() as nursery:
            for name in "abcd":
                nursery.start_soon(worker, name)
        assert most == 1
        assert sorted(order) == list("abcd")
        assert not lock.locked()

    trio.run(main)


def test_read_lock_waiter_cancelled_leaves_lock_usable():
    async def main() -> None:
        lock = fuseloop.ReadLock()
        async with lock:
            with trio.move_on_after(0.01):
                async with lock:
                    pytest.fail("taken twice")
        async with lock:
            pass

    trio.run(main)


def test_queued_request_is_taken_without_the_scheduler(pair):
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter(yield_interval=60.0)
        b.send(b"x")
        await trio.sleep(0)  # start the interval now
        with trio.testing.assert_no_checkpoints():
            for _ in range(100):
                await waiter.wait_readable(a.fileno())
        assert waiter.fast == 100

    trio.run(main)


def test_waits_for_a_request_that_is_not_there_yet(pair):
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_after, 0.05, lambda: b.send(b"x"))
            start = trio.current_time()
            with trio.testing.assert_checkpoints():
                await waiter.wait_readable(a.fileno())
            assert trio.current_time() - start >= 0.04
        assert a.recv(1) == b"x"
        assert waiter.slow == 1

    trio.run(main)


def test_other_tasks_still_run_while_requests_keep_coming(pair):
    # A handler that never awaits anything, with a request always queued: the
    # loop must still yield every yield_interval, or a timer (the key-state
    # watcher, a deletion window) or a finished worker thread would starve.
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter(yield_interval=0.002)
        ticker = _Ticker(0)
        b.send(b"x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker.run)
            await trio.sleep(0)
            ticks_before = ticker.ticks
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                await waiter.wait_readable(a.fileno())
            assert ticker.ticks - ticks_before >= 10  # ~50 yields in 0.1 s at 2 ms
            result = await trio.to_thread.run_sync(lambda: 42)  # a worker thread's result arrives
            assert result == 42
            nursery.cancel_scope.cancel()
        assert waiter.fast > 0 and waiter.yields > 0
        assert waiter.slow == 0  # it yielded without going to sleep: a request was always there

    trio.run(main)


def test_closing_the_fd_ends_a_waiter(pair):
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_after, 0.02, lambda: trio.lowlevel.notify_closing(a))
            with pytest.raises(trio.ClosedResourceError):
                await waiter.wait_readable(a.fileno())

    trio.run(main)


def _send_from_thread_after(sock: socket.socket, delay: float) -> threading.Thread:
    # A thread, not a trio task: a task could not run while the loop spins.
    def send() -> None:
        time.sleep(delay)
        sock.send(b"x")

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_request_arriving_while_spinning_is_taken_without_the_scheduler(pair):
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter(yield_interval=60.0, spin_interval=5.0)
        await trio.sleep(0)  # start the interval now
        sender = _send_from_thread_after(b, 0.02)
        with trio.testing.assert_no_checkpoints():
            await waiter.wait_readable(a.fileno())
        sender.join()
        assert (waiter.fast, waiter.spun, waiter.slow) == (1, 1, 0)

    trio.run(main)


def test_spin_ends_when_the_loop_owes_the_scheduler_a_turn(pair):
    # Spinning counts against the yield interval: other tasks still run on time.
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter(yield_interval=0.01, spin_interval=60.0)
        ticker = _Ticker(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker.run)
            await trio.sleep(0)
            sender = _send_from_thread_after(b, 0.2)
            start = time.monotonic()
            await waiter.wait_readable(a.fileno())
            assert time.monotonic() - start >= 0.15
            sender.join()
            assert ticker.ticks >= 20  # the ticker ran while the request was awaited
            nursery.cancel_scope.cancel()
        assert waiter.slow == 1 and waiter.spun == 0

    trio.run(main)


def test_no_spin_while_a_cpu_bound_job_runs(pair):
    a, b = pair

    async def main() -> None:
        waiter = fuseloop.ReadinessWaiter(yield_interval=60.0, spin_interval=60.0)
        release = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fuseloop.run_cpu_bound, release.wait)
            await trio.sleep(0.01)  # the job is running in its thread
            assert fuseloop._cpu_bound_jobs == 1
            sender = _send_from_thread_after(b, 0.05)
            await waiter.wait_readable(a.fileno())  # sleeps in trio instead of spinning
            sender.join()
            release.set()
        assert (waiter.spun, waiter.slow) == (0, 1)
        assert fuseloop._cpu_bound_jobs == 0

    trio.run(main)


def test_cpu_bound_job_count_drops_when_the_job_fails():
    async def main() -> None:
        def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError):
            await fuseloop.run_cpu_bound(fail)
        assert fuseloop._cpu_bound_jobs == 0
        assert await fuseloop.run_cpu_bound(sum, [1, 2]) == 3

    trio.run(main)


def test_install_replaces_only_the_two_primitives():
    try:
        waiter = fuseloop.install(yield_interval=0.005, spin_interval=0.0001)
        shim = pyfuse3.trio
        assert shim is not trio
        assert shim.Lock is fuseloop.ReadLock
        assert shim.lowlevel.wait_readable == waiter.wait_readable
        assert waiter.yield_interval == 0.005
        assert waiter.spin_interval == 0.0001
        # Everything else pyfuse3 uses is trio's own.
        assert shim.open_nursery is trio.open_nursery
        assert shim.ClosedResourceError is trio.ClosedResourceError
        assert shim.lowlevel.current_task is trio.lowlevel.current_task
        assert shim.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
        assert shim.lowlevel.notify_closing is trio.lowlevel.notify_closing
        with pytest.raises(AttributeError):
            shim.no_such_name  # noqa: B018
    finally:
        fuseloop.uninstall()
    assert pyfuse3.trio is trio


def _read_uncached(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        # Drop the kernel's cached pages of it, so that the reads reach the daemon.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def test_mount_serves_many_small_requests_and_threaded_io_together(mounted):
    # Small requests run inline and skip the scheduler; 1 MiB writes and reads
    # go to worker threads, whose results must still be delivered while small
    # requests stream in.
    root = mounted.path
    for i in range(50):
        (root / f"small{i}").write_bytes(b"%d" % i)
    errors: list[BaseException] = []

    def big_io(k: int) -> None:
        try:
            for _ in range(5):
                data = os.urandom(2 << 20)
                (root / f"big{k}").write_bytes(data)
                assert _read_uncached(root / f"big{k}") == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def stats() -> None:
        try:
            for _ in range(20):
                for i in range(50):
                    assert (root / f"small{i}").stat().st_size == len(b"%d" % i)
                    assert (root / f"small{i}").read_bytes() == b"%d" % i
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=big_io, args=(k,)) for k in range(2)]
    threads += [threading.Thread(target=stats) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
