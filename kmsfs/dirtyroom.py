"""Whether a buffered write to the backing store can be made without being throttled.

The request loop may write a large request to the backing file itself
(kmsfs/cipherfile.py, ``CipherFile.write_steps``) instead of in a worker
thread, which saves two thread wake-ups per request.  A buffered ``pwrite``
into the page cache normally returns in well under a millisecond, but the
kernel makes a writer wait (``balance_dirty_pages``) once dirty and
writeback pages pass the midpoint between the background and the foreground
dirty thresholds, the "freerun" ceiling.  A loop that waited there would
stall every other request of the mount, so the loop writes only while the
system has at least ``HEADROOM_BYTES`` below that ceiling, and leaves
everything else to worker threads.

The figures come from /proc/vmstat, read at most every ``REFRESH_SECONDS``;
the headroom covers what a fast writer can dirty between two reads.  A cgroup
memory limit gives the daemon thresholds of its own, which /proc/vmstat does
not show, so under one (see memory_limited_cgroup) the answer is always no.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Room that must be left below the freerun ceiling: a writer at 1 GB/s dirties
#: about 50 MB between two reads of /proc/vmstat.
HEADROOM_BYTES = 256 << 20
#: How long one reading of /proc/vmstat is trusted.
REFRESH_SECONDS = 0.02

_PAGE = os.sysconf("SC_PAGE_SIZE")
_FIELDS = ("nr_dirty", "nr_writeback", "nr_dirty_threshold", "nr_dirty_background_threshold")


def parse_vmstat(text: str) -> dict[str, int]:
    """The fields of /proc/vmstat that the dirty throttle uses, in pages."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in _FIELDS:
            values[name] = int(value)
    return values


def room_below_freerun(values: dict[str, int]) -> int:
    """Bytes that may still be dirtied before writers start to be throttled."""
    ceiling = (values["nr_dirty_threshold"] + values["nr_dirty_background_threshold"]) // 2
    return (ceiling - values["nr_dirty"] - values["nr_writeback"]) * _PAGE


#: cgroup v1 reports "no limit" as the largest page count times the page size (about 2^63).
_V1_UNLIMITED = 1 << 62


def _cgroup_mounts(mountinfo: str) -> dict[str, str]:
    """Where the cgroup v2 hierarchy ("2") and v1's memory controller ("1") are mounted."""
    mounts: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, extra = fields.split(), tail.split()
        if len(parts) < 5 or len(extra) < 3:
            continue
        if extra[0] == "cgroup2":
            mounts.setdefault("2", parts[4])
        elif extra[0] == "cgroup" and "memory" in extra[2].split(","):
            mounts.setdefault("1", parts[4])
    return mounts


def _limited(mountpoint: str, relative: str, names: tuple[str, ...], limited: Callable[[str], bool]) -> str | None:
    """The first directory from ``relative`` up to ``mountpoint`` where one of ``names`` sets a limit."""
    base = Path(mountpoint)
    path = base / relative.lstrip("/")
    while True:
        for name in names:
            try:
                if limited((path / name).read_text().strip()):
                    return str(path)
            except (OSError, ValueError):
                pass  # no such file there (the root has none): no limit at this level
        if path == base or base not in path.parents:
            return None
        path = path.parent


def memory_limited_cgroup(proc_cgroup: str = "/proc/self/cgroup",
                          mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The first cgroup at or above the daemon's with a memory limit, or None.

    cgroup v2: ``memory.max`` or ``memory.high``; cgroup v1 (also beside v2, as
    in a hybrid layout): ``memory.limit_in_bytes``.  Near such a limit the
    kernel throttles writers or reclaims behind their backs, and
    /proc/vmstat shows none of it.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
        mounts = _cgroup_mounts(Path(mountinfo).read_text())
    except OSError:
        return None
    for line in lines:
        number, controllers, relative = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and "2" in mounts:
            found = _limited(mounts["2"], relative, ("memory.max", "memory.high"), lambda v: v != "max")
        elif "memory" in controllers.split(",") and "1" in mounts:
            found = _limited(mounts["1"], relative, ("memory.limit_in_bytes",), lambda v: int(v) < _V1_UNLIMITED)
        else:
            continue
        if found is not None:
            return found
    return None


class DirtyRoom:
    """Answers "may this many bytes be written now without a throttle wait?"."""

    def __init__(self, read_vmstat: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic, limited_by: str | None = None) -> None:
        self._read_vmstat = read_vmstat or (lambda: Path("/proc/vmstat").read_text())
        self._clock = clock
        self._checked_at = -1e9
        self._room = 0
        #: Writes refused for want of room, for .kmsfs/status.
        self.refusals = 0
        #: Why the answer is always no, for the log and status; None when it is not.
        self.off_reason: str | None = None
        if limited_by is not None:
            self.off_reason = f"memory limit on cgroup {limited_by}"
        else:
            try:
                room_below_freerun(parse_vmstat(self._read_vmstat()))
            except (OSError, KeyError, ValueError) as exc:
                self.off_reason = f"/proc/vmstat unreadable ({exc})"
        if self.off_reason is not None:
            log.info("large writes stay in worker threads: %s", self.off_reason)

    def stats(self) -> dict[str, object]:
        return {"off_reason": self.off_reason, "refusals": self.refusals}

    def allows(self, nbytes: int) -> bool:
        if self.off_reason is not None:
            return False
        now = self._clock()
        if now - self._checked_at >= REFRESH_SECONDS:
            try:
                self._room = room_below_freerun(parse_vmstat(self._read_vmstat()))
            except (OSError, KeyError, ValueError):
                self._room = 0
            self._checked_at = now
        if self._room - nbytes < HEADROOM_BYTES:
            self.refusals += 1
            return False
        self._room -= nbytes  # until the next reading, count our own writes
        return True
