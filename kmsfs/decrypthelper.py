"""Decrypting part of each large cached read on the second CPU, in a helper process.

A cold sequential read is bound by the request loop's one CPU: it takes
each 1 MiB READ, copies the blocks from the backing file's page cache,
decrypts them and replies (docs/operations.md, "The request loop").  A
second thread cannot share the decryption: AES-GCM on a 4 KiB block
releases the GIL for about a microsecond, and two threads decrypting at
once got less done than one (kmsfs/cipherfile.py, ``_bulk_crypto``).  A
process has a GIL of its own.  So for a read of at least MIN_BLOCKS blocks
that the loop answers from the page cache (or from the chunks that
kmsfs/directstream.py read ahead), the loop copies the ciphertext into a
shared memory region, hands the last HELPER_SHARE of its blocks to
this helper, decrypts the first ones itself meanwhile, waits for the
helper's answer, and replies from the region.

Measured with a 1 GiB file read cold with ``dd bs=1M``, alternating kmsfs
with and without the helper and gocryptfs on the 2-CPU VM: in 8 rounds,
medians 684 MB/s with it, 552 without, gocryptfs 592, kmsfs faster than
gocryptfs in 6 rounds with it and 4 without; in 12 rounds of a prototype,
508, 468 and 453 MB/s, 11 and 7 rounds.  The loop's own CPU time per GiB
fell from 0.98-2.63 s to 0.76-1.45 s (the helper's is on the other CPU).
docs/operations.md has the details.

What the helper holds: the DEK of the file being read, for the length of
one request.  The daemon sends it with every request over a socket pair
that only the two processes hold; the helper keeps no key between
requests, never reads or writes a file, and answers only which block, if
any, failed authentication.  Every check (the CMK's state, grants, the
header) has happened in the daemon before the read reaches this point.

Wire protocol (an AF_UNIX SOCK_SEQPACKET pair, the helper's end on its
standard input; the region is a memfd of 2 x REGION_SIZE bytes, ciphertext
in the first half and plaintext in the second)::

    request: dek (32) || file_id (16) || u32 ct_block_size || u64 first_block
             || u32 ct_offset || u32 ct_length || u32 pt_offset      (little-endian)
    answer:  i64 bad_block: -1 all blocks authentic, -2 a malformed request,
             else the number of the first block that failed authentication

One request is outstanding at a time, and only the trio thread sends them.
If the helper does not answer within ANSWER_TIMEOUT, or has ended, it is
killed and not used again: the loop then decrypts whole reads itself, as
it does without the helper, and nothing read is lost or wrong.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from .contentcrypt import BlockAuthError, ContentCipher
from .format import BLOCK_OVERHEAD, FILE_ID_SIZE
from .helperprocess import start_helper, wait_for_helper

log = logging.getLogger(__name__)

#: Bytes of ciphertext (and, separately, of plaintext) the region holds: a
#: 1 MiB READ (the largest the kernel sends) is 1 MiB + 7 KiB of blocks.
REGION_SIZE = 2 << 20
#: Reads of fewer blocks are decrypted by the loop alone: the round trip to
#: the helper (two system calls and a wake-up each way) would cost more than
#: the half of the decryption it saves.
MIN_BLOCKS = 64
#: The helper's share of a read's blocks.  More than half, because the loop
#: also copies the ciphertext in and the plaintext out and answers FUSE:
#: cold 1 GiB reads, 8 alternating rounds, 5/8 with the helper polling
#: (below) against 1/2 without: median 447 against 382 MB/s, faster in 6.
HELPER_SHARE_EIGHTHS = 5
#: How long the helper polls for the next request before it blocks.  A
#: sequential reader's next request comes within a millisecond; a helper
#: that slept would have its idle CPU woken through the hypervisor each time.
POLL_SECONDS = 150e-6
#: How long the loop waits for an answer before it gives up on the helper.
ANSWER_TIMEOUT = 2.0
EXIT_TIMEOUT = 5.0

_DEK_SIZE = 32
_REQUEST = struct.Struct(f"<{_DEK_SIZE}s{FILE_ID_SIZE}sIQIII")
_ANSWER = struct.Struct("<q")
_AUTHENTIC = -1
_MALFORMED = -2


class DecryptHelper:
    """The daemon's side.  Used by the trio thread only."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket, region: mmap.mmap) -> None:
        self._process = process
        self._sock = sock
        self._region = region
        self._view = memoryview(region)
        self._answer = bytearray(_ANSWER.size)
        self._ended = False
        self._owner = threading.get_ident()
        #: Reads shared with the helper, and reads it failed (then decrypted by the loop alone).
        self.shared_reads = 0
        self.failures = 0

    @classmethod
    def start(cls) -> DecryptHelper:
        """Start the helper process.  Raises OSError if it cannot be started."""
        memfd = os.memfd_create("kmsfs-decrypt", os.MFD_CLOEXEC)
        region: mmap.mmap | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.ftruncate(memfd, 2 * REGION_SIZE)
            region = mmap.mmap(memfd, 2 * REGION_SIZE)
            process = start_helper("kmsfs.decrypthelper", [str(memfd)], stdin=theirs, pass_fds=(memfd,))
        except BaseException:
            ours.close()
            if region is not None:
                region.close()
            raise
        finally:
            theirs.close()
            os.close(memfd)
        ours.settimeout(ANSWER_TIMEOUT)
        log.debug("decrypt helper started, pid %d", process.pid)
        return cls(process, ours, region)

    @property
    def pid(self) -> int:
        return self._process.pid

    def ciphertext_buffer(self, size: int) -> memoryview | None:
        """Where to read ``size`` bytes of ciphertext for ``decrypt``; None: decrypt without the helper."""
        if self._ended or size > REGION_SIZE or threading.get_ident() != self._owner:
            return None
        return self._view[:size]

    def decrypt(self, cipher: ContentCipher, size: int, first_block: int) -> memoryview | bytearray:
        """Decrypt the ``size`` bytes of blocks that ``ciphertext_buffer`` was given.

        Returns a view of the plaintext in the shared region, valid until the
        next call (pyfuse3 copies a read's answer into the kernel before it
        takes the next request); or, if the helper failed, a buffer of its own.
        Raises BlockAuthError naming the first block that failed.
        """
        ciphertext = self._view[:size]
        cbs = cipher.ct_block_size
        nblocks = -(-size // cbs)
        # Also raises for a tail too short to be a block: damage to report,
        # not a request for the helper (which would refuse it as malformed).
        total = cipher.plaintext_length(size, first_block)
        if nblocks < MIN_BLOCKS or self._ended:
            return cipher.decrypt(ciphertext, first_block)
        ours = nblocks - nblocks * HELPER_SHARE_EIGHTHS // 8
        ct_split = ours * cbs
        pt_split = ct_split - ours * BLOCK_OVERHEAD
        plaintext_start = REGION_SIZE
        try:
            self._sock.send(_REQUEST.pack(cipher.key_for_decrypt_helper(), cipher.file_id, cbs,
                                          first_block + ours, ct_split, size - ct_split,
                                          plaintext_start + pt_split), socket.MSG_NOSIGNAL)
        except OSError as exc:
            self._give_up(f"could not send it a request ({exc})")
            return cipher.decrypt(ciphertext, first_block)
        try:
            cipher.decrypt_into(ciphertext[:ct_split], first_block,
                                self._view[plaintext_start:plaintext_start + pt_split])
        except BlockAuthError:
            # Its answer must still be taken, or the next request would get it.
            self._take_answer()
            raise
        bad = self._take_answer()
        if bad is None:
            return cipher.decrypt(ciphertext, first_block)
        if bad >= 0:
            raise BlockAuthError(bad, "authentication failed")
        self.shared_reads += 1
        return self._view[plaintext_start:plaintext_start + total]

    def _take_answer(self) -> int | None:
        """The helper's answer; None if it gave none (then it is not used again)."""
        try:
            got = self._sock.recv_into(self._answer)
        except TimeoutError:
            self._give_up(f"no answer within {ANSWER_TIMEOUT:.0f} s")
            return None
        except OSError as exc:
            self._give_up(f"could not read its answer ({exc})")
            return None
        if got != _ANSWER.size:
            self._give_up("it ended" if got == 0 else f"an answer of {got} bytes")
            return None
        (bad,) = _ANSWER.unpack(self._answer)
        if bad == _MALFORMED:
            self._give_up("it refused a request as malformed")
            return None
        return bad

    def _give_up(self, why: str) -> None:
        self.failures += 1
        if self._ended:
            return
        self._ended = True
        log.warning("decrypt helper (pid %d): %s; the request loop decrypts on its own from now on",
                    self._process.pid, why)
        # It may be in the middle of writing the region: it must be gone
        # before the region is used again.
        self._process.kill()
        self._process.wait()
        self._sock.close()

    def stats(self) -> dict[str, object]:
        return {"helper_pid": None if self._ended else self._process.pid, "shared_reads": self.shared_reads,
                "failures": self.failures}

    def close(self) -> None:
        """Tell the helper to end (EOF), and wait for it."""
        if not self._ended:
            self._ended = True
            self._sock.close()
            status = wait_for_helper(self._process, "decrypt helper", EXIT_TIMEOUT)
            if status != 0:
                log.warning("the decrypt helper (pid %d) ended with status %d", self._process.pid, status)
        try:
            self._view.release()
            self._region.close()
        except BufferError:
            pass  # a reply's view is still referenced somewhere; the mapping ends with the process


# ----------------------------------------------------------------------------- helper


def _answer_for(request: bytes | bytearray, region: memoryview) -> int:
    """Decrypt the blocks one request names, from and into the region; the answer to send."""
    dek, file_id, cbs, first_block, ct_offset, ct_length, pt_offset = _REQUEST.unpack(request)
    if cbs <= BLOCK_OVERHEAD or ct_length == 0 or ct_offset + ct_length > REGION_SIZE:
        return _MALFORMED
    cipher = ContentCipher(dek, file_id, cbs - BLOCK_OVERHEAD)
    try:
        pt_length = cipher.plaintext_length(ct_length, first_block)
    except BlockAuthError:  # the daemon checks the tail before it asks
        return _MALFORMED
    if pt_offset < REGION_SIZE or pt_offset + pt_length > 2 * REGION_SIZE:
        return _MALFORMED
    try:
        cipher.decrypt_into(region[ct_offset:ct_offset + ct_length], first_block,
                            region[pt_offset:pt_offset + pt_length])
    except BlockAuthError as exc:
        return exc.block_number
    return _AUTHENTIC


def serve(sock: socket.socket, region: memoryview) -> None:
    """Answer requests until the daemon closes its end."""
    request = bytearray(_REQUEST.size)
    while True:
        got = -1
        deadline = time.perf_counter() + POLL_SECONDS
        while True:
            try:
                got = sock.recv_into(request, 0, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    break
        if got < 0:
            got = sock.recv_into(request)
        if got == 0:
            return
        answer = _answer_for(request, region) if got == _REQUEST.size else _MALFORMED
        sock.send(_ANSWER.pack(answer), socket.MSG_NOSIGNAL)


def main() -> None:
    # The daemon ends this helper by closing the socket, after its unmount;
    # a stray Ctrl-C or hang-up must not end it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    memfd = int(sys.argv[1])
    region = mmap.mmap(memfd, 2 * REGION_SIZE)
    os.close(memfd)
    sock = socket.socket(fileno=sys.stdin.fileno())
    serve(sock, memoryview(region))


if __name__ == "__main__":
    main()
