"""A bounded, time-limited cache of unwrapped DEKs.  Pure: no I/O.

Opening a file means one HSM unwrap of its DEK.  With SoftHSM2 that call
takes 27 us in a tight loop but 250-300 us in the daemon, where every open
finds the module's code and its token files cold (SoftHSM2 also re-checks its
object files on each call).  Reading a tree of files that this mount created
or opened a moment ago spent most of its time there.  So, like the data key
caches of cloud KMS clients (AWS Encryption SDK's caching CMM), the daemon
keeps the DEK of a header it has unwrapped or created, for a while:

* The key is the whole header as stored: every field the wrap authenticates
  (file id, CMK id and version, encryption context, format) plus the wrap
  nonce and wrapped DEK.  A header that differs in any byte, a tampered or
  foreign one included, misses and goes to the HSM, which judges it.
* An entry lives at most ``max_age`` seconds after the unwrap (or wrap) that
  made it, however often it is used, and the least recently used entries go
  first beyond ``capacity``.
* It does not replace any check: the CMK's state (and the caller's grant) is
  checked on every open as before, so a disabled key cuts off a cached DEK
  at once.  Entries of a key that is no longer Enabled are dropped as well
  (``forget_key``), so that its DEKs do not stay in memory.

What it keeps is up to its user: the envelope keeps the parsed header and
the file's cipher (kmsfs/envelope.py), so that a hit costs neither a parse
nor a new AES key schedule.  In the daemon, during a cold ``tar cf`` of
2,445 files, those two were 17% of an open's time (py-spy); a loop measures
5.3 us for both, the daemon many times that, with its caches cold between
requests.  The price is memory: about 3 KiB an entry (OpenSSL's key
schedule and GHASH tables, 2.5 KiB, plus the header), so at most about
24 MiB at the default capacity of 8,192.

Thread-safe: the daemon opens and creates files on its trio thread and, when
the HSM is slow, in worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class DekCache(Generic[V]):
    """header bytes -> what its DEK opened, for at most ``capacity`` headers and ``max_age`` seconds."""

    def __init__(self, capacity: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1 or max_age <= 0:
            raise ValueError("a DEK cache needs a capacity of at least 1 and a positive max age")
        self.capacity = capacity
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        #: header bytes -> (expiry time, CMK id bytes, value); oldest use first.
        self._entries: OrderedDict[bytes, tuple[float, bytes, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, header: bytes) -> V | None:
        with self._lock:
            entry = self._entries.get(header)
            if entry is not None:
                if entry[0] > self._clock():
                    self._entries.move_to_end(header)
                    self.hits += 1
                    return entry[2]
                del self._entries[header]
            self.misses += 1
            return None

    def put(self, header: bytes, key_id: bytes, value: V) -> None:
        with self._lock:
            self._entries[header] = (self._clock() + self.max_age, key_id, value)
            self._entries.move_to_end(header)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget_key(self, key_id: bytes) -> int:
        """Drop every entry under the CMK ``key_id`` (16 bytes); returns how many."""
        with self._lock:
            gone = [h for h, (_, kid, _) in self._entries.items() if kid == key_id]
            for header in gone:
                del self._entries[header]
            return len(gone)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}
