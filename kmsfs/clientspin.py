"""Keeping a waiting client's CPU awake while it sends requests one after another.

A program that reads or writes a file in small pieces, one after another
(a database, fio with psync, tar), or walks a tree (ls -lR, find), sleeps
in the kernel while the daemon serves each request, and its CPU has
nothing else to do, so it goes idle.
On these VMs an idle vCPU halts (they boot with guest halt-polling off,
``haltpoll.guest_halt_poll_ns=0``), and the daemon's reply then has to wake
it through the hypervisor.  The request loop already polls for the next
request instead of sleeping (kmsfs/fuseloop.py), which keeps the daemon's
own CPU awake; this module does the same for the other CPU, the client's.

The cost of that halt grows with the time the daemon takes per request: a
request loop that answers without doing any work gives fio (4 KiB random
read/write, psync) 17,000 read IOPS on these VMs, the same loop busy for 10
and 20 us per read and write 8,100, and for 35 and 59 us (what kmsfs takes:
reading and decrypting two blocks, merging and encrypting them again) 5,000.
With this helper, alternating 8-second rounds of that fio through kmsfs:
3,100 to 5,900 read IOPS without it, 5,900 to 8,400 with it; gocryptfs
3,000 to 5,200 in the same rounds.

How: a helper process runs a busy loop at ``SCHED_IDLE``, the lowest
scheduling priority.  Any other task on its CPU, the client first of all,
preempts it at once, so it takes only time that the CPU would have spent
halted, and the scheduler runs it where there is such time: on a machine
with two CPUs, the one the client sleeps on while the daemon's loop polls
on the other.  (Pinning it to the client's CPU, looked up every 10 ms in
``/proc``, did worse: 4,400 to 5,700.)  With more CPUs it may well spin on
one that nobody waits on, so the mount starts it by default only where
exactly two CPUs are allowed (kmsfs/mount.py).  It spins only while
requests keep coming: after ``idle_us`` without one it sleeps in a blocking
read, and the daemon wakes it with one byte on a pipe.  Every request whose
sender waits for the answer counts (fs._fuse_op), except reads and writes
over 64 KiB: a sequential reader or writer keeps both CPUs busy without help.
Nor does any for a while after an OPEN (ClientSpinner.note_open): a program
opening file after file was slower with the helper spinning.

Why a process: a thread of the daemon spinning in Python would hold the GIL
that the request loop needs.

Shared state, a memfd of one page that both map (native byte order)::

    offset 0  u32  beat: the daemon adds one per request it counts
    offset 4  u8   1 while the helper sleeps; the daemon clears it and wakes it

The helper ends at end of file on its pipe: when the daemon closes it at
unmount, or dies.  It holds no key, no file of the store and no FUSE
descriptor, and reads nothing but the shared page and its pipe.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import struct
import subprocess
import sys
import time

from .helperprocess import start_helper, wait_for_helper

log = logging.getLogger(__name__)

#: How long, by default, the helper keeps spinning after the last request.
IDLE_US = 2000
#: A pause between two turns of the busy loop longer than this means the helper
#: was not running (other tasks had the CPU): that time does not count as quiet.
STARVED_SECONDS = 200e-6
#: After an OPEN, how long no request keeps the helper spinning (see
#: ClientSpinner.note_open).  A tree reader opens a file every few hundred
#: microseconds; fio and databases open their files once.
QUIET_AFTER_OPEN = 0.005
#: How long close() waits for the helper to notice the end of its pipe.
EXIT_TIMEOUT = 5.0

_BEAT = struct.Struct("=I")
_SLEEPING_OFFSET = 4
_SHARED_SIZE = mmap.PAGESIZE
#: Exit status of a helper that could not take SCHED_IDLE: it must not spin at
#: normal priority, where it would take CPU time from the client.
EXIT_NO_IDLE_PRIORITY = 3


class ClientSpinner:
    """The daemon's side: starts the helper and tells it about requests, never waiting."""

    def __init__(self, process: subprocess.Popen[bytes], shared: mmap.mmap, wake_fd: int) -> None:
        self._process = process
        self._shared = shared
        self._wake_fd = wake_fd
        self._beat = 0
        self._ended = False
        #: Requests before this time (time.monotonic) do not count; 0: none held off.
        self._quiet_until = 0.0
        #: Times the daemon woke the sleeping helper (for the unmount log line).
        self.wakeups = 0

    @classmethod
    def start(cls, idle_us: int = IDLE_US) -> ClientSpinner:
        """Start the helper process.  Raises OSError if it cannot be started."""
        memfd = os.memfd_create("kmsfs-client-spin", os.MFD_CLOEXEC)
        read_end = write_end = -1
        shared: mmap.mmap | None = None
        try:
            os.ftruncate(memfd, _SHARED_SIZE)
            shared = mmap.mmap(memfd, _SHARED_SIZE)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(write_end, False)
            process = start_helper("kmsfs.clientspin", [str(memfd), str(idle_us)], stdin=read_end,
                                   pass_fds=(memfd,))
        except BaseException:
            if write_end >= 0:
                os.close(write_end)
            if shared is not None:
                shared.close()
            raise
        finally:
            os.close(memfd)
            if read_end >= 0:
                os.close(read_end)
        log.debug("client spin helper started, pid %d", process.pid)
        return cls(process, shared, write_end)

    @property
    def pid(self) -> int:
        return self._process.pid

    def cpu_seconds(self) -> float | None:
        """CPU time the helper has used so far (None once it has ended)."""
        try:
            with open(f"/proc/{self._process.pid}/stat", "rb") as fh:
                data = fh.read()
            fields = data[data.rindex(b")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def stats(self) -> dict[str, object]:
        return {"helper_pid": None if self._ended else self._process.pid, "wakeups": self.wakeups}

    def note_open(self) -> None:
        """A file is being opened: no request counts for QUIET_AFTER_OPEN from now.

        A program that opens file after file (a cold ``tar cf`` of the bench
        tree) was slower with the helper spinning than without it: 1.149
        against 1.022 s and 1.030 against 0.931 s (medians of 8 and 10
        alternating rounds, faster without it in 14 of 18), while fio's 4 KiB
        random I/O, which opens its file once, had 9.2k read IOPS with it
        against 6.9k without (6 rounds).  So opens are not counted, and hold
        the count off for a while: the helper goes to sleep during a tree
        read and spins again once the opens stop.  With that, the same tar
        took 0.983 s against 1.051 s without the helper (10 rounds), and fio
        kept its rate (9.5k against 8.8k, 4 rounds).  Why spinning slows the
        tree reader is not known: neither a cold ``tar cf`` of the plain tree
        nor a CPU-bound loop on the other CPU is slowed by a busy loop at
        SCHED_IDLE.
        """
        self._quiet_until = time.monotonic() + QUIET_AFTER_OPEN

    def note_request(self) -> None:
        """A request is being served: its sender waits, keep its CPU awake.

        On the path of nearly every request (fs._fuse_op), so it costs one
        store in the common case, and a one-byte write when the helper sleeps.
        Nothing while opens hold the count off (note_open).
        """
        if self._quiet_until:
            if time.monotonic() < self._quiet_until:
                return
            self._quiet_until = 0.0
        shared = self._shared
        self._beat = beat = (self._beat + 1) & 0xFFFFFFFF
        _BEAT.pack_into(shared, 0, beat)
        if shared[_SLEEPING_OFFSET] and not self._ended:
            shared[_SLEEPING_OFFSET] = 0
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_fd, b"\1")
            self.wakeups += 1
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        except OSError as exc:  # EPIPE: it has ended
            self._ended = True
            log.warning("the client spin helper (pid %d) has ended (%s, exit status %s); requests "
                        "now wait for halted CPUs to wake", self._process.pid, exc, self._process.poll())

    def close(self) -> None:
        """Tell the helper to end (end of file on its pipe), and wait for it."""
        self._ended = True
        os.close(self._wake_fd)
        status = wait_for_helper(self._process, "client spin helper", EXIT_TIMEOUT)
        self._shared.close()
        if status == EXIT_NO_IDLE_PRIORITY:
            log.warning("the client spin helper could not take SCHED_IDLE priority and did not spin")
        elif status != 0:
            log.warning("the client spin helper (pid %d) ended with status %d", self._process.pid, status)


# ----------------------------------------------------------------------------- helper


def spin(shared: mmap.mmap, wake_fd: int, idle_seconds: float) -> None:
    """The helper's loop: spin while beats come, sleep on ``wake_fd`` when they stop."""
    unpack_beat = _BEAT.unpack_from
    monotonic = time.monotonic
    while True:
        last = unpack_beat(shared, 0)[0]
        quiet_since = before = monotonic()
        # The loop is the point: it keeps this CPU out of its halt state.
        while True:
            now = monotonic()
            beat = unpack_beat(shared, 0)[0]
            if beat != last or now - before > STARVED_SECONDS:
                # A request came, or this helper was not watching (the client or
                # the daemon had the CPU, as they should): not quiet yet.
                last = beat
                quiet_since = now
            elif now - quiet_since > idle_seconds:
                break
            before = now
        shared[_SLEEPING_OFFSET] = 1
        if unpack_beat(shared, 0)[0] != last:
            shared[_SLEEPING_OFFSET] = 0  # a request came meanwhile: the daemon may not have seen the flag
            continue
        if not os.read(wake_fd, 4096):
            return  # end of file: the daemon is done


def main() -> None:
    # The daemon ends this helper by closing the pipe, after its unmount;
    # a stray Ctrl-C or hang-up must not end it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    memfd, idle_us = int(sys.argv[1]), int(sys.argv[2])
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        print(f"kmsfs client spin helper: cannot take SCHED_IDLE priority ({exc}); not spinning",
              file=sys.stderr)
        sys.exit(EXIT_NO_IDLE_PRIORITY)
    shared = mmap.mmap(memfd, _SHARED_SIZE)
    os.close(memfd)
    spin(shared, sys.stdin.fileno(), idle_us / 1e6)


if __name__ == "__main__":
    main()
