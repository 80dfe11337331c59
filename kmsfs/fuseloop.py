"""A cheaper request loop for pyfuse3 under trio.

pyfuse3's worker tasks take every FUSE request the same way: ``async with
read_lock`` (a ``trio.Lock``), then ``await trio.lowlevel.wait_readable(fd)`` on
/dev/fuse, then read and dispatch.  Both awaits always go through trio's
scheduler, even when the lock is free and the next request is already queued,
and the fair ``trio.Lock`` hands itself to a parked worker on every release, so
that each request also switches tasks.  Measured with py-spy during ``ls -lR``,
that machinery was about 30% of the samples: more than our own handlers.

pyfuse3 looks these primitives up through its module attribute ``pyfuse3.trio``
(the hook its own asyncio mode uses), so :func:`install` can give it a
namespace that is trio except for two names:

- ``Lock``: taken without a checkpoint when free; a release wakes one parked
  worker but does not hand the lock over, so the worker that just answered a
  request reads the next one itself unless it has yielded meanwhile.
- ``lowlevel.wait_readable``: returns at once when a zero-timeout poll finds a
  request queued.  Since handlers that need no I/O thread never yield either, it
  still gives the scheduler a turn at least every ``YIELD_INTERVAL`` seconds
  (a checkpoint, not a sleep), so that timers, finished worker threads and
  other tasks keep running.

Both keep pyfuse3's contract: one task at a time waits on the fd (the lock),
and nothing yields between "readable" and pyfuse3's read of the request.

When no request is queued, ``wait_readable`` keeps polling for up to
``SPIN_INTERVAL`` before it lets the thread sleep.  On a virtual machine a
sleeping thread is expensive to wake: its idle vCPU halts (these machines boot
with guest halt-polling off, ``haltpoll.guest_halt_poll_ns=0``), and waking it
takes an interrupt through the hypervisor.  A client that sends one request
after another (ls, tar, cp, a database doing small reads) would pay that on
every request, and ``perf`` showed it as half of the daemon's CPU time per
request.  Measured with a getxattr loop on one file: 100 -> 50 us per request,
and the daemon's CPU per request fell from 77 to 50 us, since the wakeups were
charged to it.  The spin is skipped while a CPU-bound worker thread runs
(:func:`run_cpu_bound`): each poll releases the GIL, and the worker would have
to win it back every time.
"""

from __future__ import annotations

import logging
import select
import time
import types
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest run of requests answered without letting other trio tasks run.
YIELD_INTERVAL = 0.002
#: How long to keep polling for the next request before sleeping.  Longer than
#: the gap between the system calls of a busy client (tens of microseconds),
#: short enough that an idle mount costs nothing noticeable.
SPIN_INTERVAL = 50e-6

#: CPU-bound jobs in worker threads right now (see run_cpu_bound).
_cpu_bound_jobs = 0
#: The installed waiter (see install), for request_waiting.
_waiter: ReadinessWaiter | None = None


async def run_cpu_bound(fn: Callable[..., T], *args: Any) -> T:
    """``trio.to_thread.run_sync`` for work that needs the GIL much of the time.

    Bulk encryption and decryption: while such a job runs, the request loop
    sleeps instead of spinning, so that its polls do not take the GIL from the
    worker over and over.  Threads that mostly wait in system calls (fsync,
    prefetching) can use trio directly.
    """
    global _cpu_bound_jobs
    _cpu_bound_jobs += 1
    try:
        return await trio.to_thread.run_sync(fn, *args)
    finally:
        _cpu_bound_jobs -= 1


class ReadLock:
    """pyfuse3's read lock: at most one worker waits for the next request.

    Unfair on purpose (see the module docstring): fairness between identical
    workers buys nothing and costs a task switch per request.
    """

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        if self._lot:
            # The woken worker checks again when it runs; by then the releaser
            # may hold the lock again, and the woken one parks once more.
            self._lot.unpark()

    def locked(self) -> bool:
        return self._held


class ReadinessWaiter:
    """``wait_readable`` that skips the scheduler while requests are queued."""

    def __init__(self, yield_interval: float = YIELD_INTERVAL, spin_interval: float = SPIN_INTERVAL) -> None:
        self.yield_interval = yield_interval
        self.spin_interval = spin_interval
        self._polls: dict[int, select.poll] = {}
        self._last_yield = time.monotonic()
        #: Requests taken without (fast) and with (slow) a trip through the scheduler, for tests and profiling.
        self.fast = 0
        self.slow = 0
        #: Of the fast ones, those that arrived while the loop was spinning.
        self.spun = 0
        #: Turns given to the scheduler without sleeping (every yield_interval).
        self.yields = 0

    def _poll_for(self, fd: int) -> select.poll:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return poller

    def request_waiting(self) -> bool:
        """Whether a request is queued on /dev/fuse right now (a zero-timeout poll)."""
        return any(poller.poll(0) for poller in self._polls.values())

    async def wait_readable(self, fd: int) -> None:
        now = time.monotonic()
        if now - self._last_yield >= self.yield_interval:
            # Let the scheduler run everything else that is ready (timers, results
            # of worker threads, other tasks) without going to sleep: a request
            # may well be on its way.
            await trio.lowlevel.checkpoint()
            self.yields += 1
            self._last_yield = now = time.monotonic()
        poller = self._poll_for(fd)
        if poller.poll(0):
            self.fast += 1
            return
        if self.spin_interval > 0 and not _cpu_bound_jobs:
            deadline = min(now + self.spin_interval, self._last_yield + self.yield_interval)
            while time.monotonic() < deadline:
                if poller.poll(0):
                    self.fast += 1
                    self.spun += 1
                    return
        self.slow += 1
        await trio.lowlevel.wait_readable(fd)
        self._last_yield = time.monotonic()


async def let_others_in() -> None:
    """A checkpoint if a request is waiting: for handlers that work on the loop for long.

    Another of pyfuse3's worker tasks then reads and answers it (and any
    others queued) before the caller goes on.  Costs one poll when none is.
    """
    if _waiter is not None and _waiter.request_waiting():
        await trio.lowlevel.checkpoint()


class _TrioForPyfuse3(types.ModuleType):
    """Looks like the trio module to pyfuse3; two names are ours."""

    def __init__(self, waiter: ReadinessWaiter) -> None:
        super().__init__("kmsfs.fuseloop.trio")
        self.Lock = ReadLock
        lowlevel = types.ModuleType("kmsfs.fuseloop.trio.lowlevel")
        lowlevel.__getattr__ = lambda name: getattr(trio.lowlevel, name)  # type: ignore[method-assign]
        lowlevel.wait_readable = waiter.wait_readable  # type: ignore[attr-defined]
        self.lowlevel = lowlevel

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(yield_interval: float = YIELD_INTERVAL, spin_interval: float = SPIN_INTERVAL) -> ReadinessWaiter:
    """Make pyfuse3 use the cheaper loop primitives (before ``pyfuse3.main``)."""
    global _waiter
    waiter = _waiter = ReadinessWaiter(yield_interval, spin_interval)
    pyfuse3.trio = _TrioForPyfuse3(waiter)  # type: ignore[attr-defined]
    log.debug("pyfuse3 request loop: ReadLock + polling wait_readable (yield every %.1f ms, spin %.0f us)",
              yield_interval * 1000, spin_interval * 1e6)
    return waiter


def uninstall() -> None:
    global _waiter
    _waiter = None
    pyfuse3.trio = trio  # type: ignore[attr-defined]
