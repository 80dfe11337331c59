"""What the daemon last read of each backing file's header.  Pure: no I/O.

Opening a file reads its header xattr from the backing file.  On ext4 the
header (106 bytes and up) does not fit in the inode, so after the kernel has
dropped its caches (memory pressure, ``drop_caches``) that read waits for a
disk block of its own, before the open can answer: in a cold ``tar cf`` of
the bench tree, about a tenth of the daemon's time.  The file's data, read
next, waits for the disk anyway; the header need not.

So the daemon remembers, per backing inode, the header bytes together with
the file's *stamp* (mtime, ctime, size) at the time it read them, and an
open whose ``fstat`` shows the same stamp uses the remembered bytes.  Every
change of an xattr, of the content or of the attributes moves the ctime,
so a header changed by anyone since (a rewrap by another mount, a restore,
a tampering) misses and is read again.  That holds only where a change
right after a ``stat`` always gets a new ctime: with timestamps of clock-tick
granularity, a change in the same tick keeps it.  The mount checks this on
the backing filesystem first (kmsfs/store.py, ``ctime_moves_after_stat``:
Linux 6.13 and later give ext4, XFS, btrfs and tmpfs such "multigrain"
timestamps) and keeps no memo where it does not hold.

What is remembered is the header as stored: no key, nothing secret.  Every
check of an open (the CMK's state, the caller's grant, the unwrap or the DEK
cache) is made with it as with a header just read.  The least recently used
entries go first beyond ``capacity``.

Used on the request loop's thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

Stamp = tuple[int, int, int]


class HeaderMemo:
    """key (the backing file's device and inode) -> the header bytes read at a stamp."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a header memo needs a capacity of at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, tuple[Stamp, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, stamp: Stamp) -> bytes | None:
        """The header remembered for ``key`` if the file still has ``stamp``; None otherwise."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def holds(self, key: Hashable, stamp: Stamp) -> bool:
        """Whether ``key``'s header is remembered at ``stamp``; not counted as a hit or miss."""
        entry = self._entries.get(key)
        return entry is not None and entry[0] == stamp

    def put(self, key: Hashable, stamp: Stamp, header: bytes) -> None:
        """Remember ``header`` as read from ``key`` while the file had ``stamp``.

        The stamp must be taken *before* the header is read: a change in
        between then leaves a newer header under an older stamp, which only
        misses later, never the reverse.
        """
        self._entries[key] = (stamp, header)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
