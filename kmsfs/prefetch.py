"""Warming the backing store's page cache in a helper process.

Reading a tree (tar, cp -r, grep -r) opens the files of a directory in the
order readdir gave them, and cold, each open would wait for the disk twice:
for the header xattr (a block of its own on ext4, as it does not fit in the
inode) and for the first data blocks.  The daemon therefore sends the names
of the next files of a listing to a helper process, which reads their
headers, several at once (HEADER_READERS threads), and after each header
asks for the file's data (``posix_fadvise`` WILLNEED, which starts the reads
without waiting), so that these waits overlap.  The page cache is shared, so
the daemon's own reads then find the blocks there.

Headers first: asking for all the data first queued up to 256 KiB per file
ahead of the small header reads that the next opens wait for.  In a cold
``tar cf`` of the bench tree (2 rounds each), opens that waited more than
50 us for their header: 634-706 of 4,828 with one header at a time and the
data asked for first, 420-490 with this order and four readers; reads that
waited as long for their data: 465-659 of 5,746, then 175-230 once the
daemon also starts the data read of the first file it opens in a directory
(which no helper was asked for).  In 16 alternating rounds: 1.36 s median
before, 1.23 s after (faster in 13 of 16).

Subdirectories: a reader going through a tree enters a subdirectory when it
reaches its name in the listing, and opens that directory's first files at
once, before any of them could be asked for.  So for a subdirectory named
in a batch, the helper warms the first SUBDIR_FILES files it lists.  Of the
first files opened in a directory, 50 of 288 then waited for their header,
against 141-288 before (2 rounds); 16 alternating rounds: 1.33 s median
against 1.46 s, faster in 11 of 16.  ``ls -lR`` opens no file, so it sends
no batch and is not slowed by any of this.

Why a process and not a thread of the daemon: a worker thread takes the GIL
back after each of its system calls (about seven per file), and the request
loop and the worker then hand it to each other thousands of times per
second, each time through a futex wake-up across CPUs.  Measured on the
benchmark's tree (cold ``tar cf``, 5 interleaved rounds, same mount
conditions): 1.54-2.36 s with two worker threads, 1.32-2.00 s with the
helper; the daemon's CPU fell from 1.59-2.08 s to 1.14-1.45 s, plus
0.22-0.26 s in the helper.

The helper never decrypts, holds no key and never writes: it opens files
read-only to read their header xattr and to give the kernel a hint, and
directories to list their first entries.  Every
check still happens when the daemon itself opens a file.

Wire protocol (an AF_UNIX SOCK_SEQPACKET pair, the helper's end on its
standard input), one message per batch::

    data:     name || 0x00 || name || 0x00 || ... || name
    SCM_RIGHTS: exactly one descriptor, of the directory the names are in

The helper closes each descriptor it receives, and ends when the daemon
closes its end (also when the daemon dies, since the kernel closes it then).
A batch the socket has no room for is dropped: prefetching is advisory, and
the request loop never waits for it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from .format import HEADER_XATTR
from .helperprocess import start_helper, wait_for_helper

log = logging.getLogger(__name__)

#: How much of each file's start the helper asks the kernel to read ahead.
PREFETCH_BYTES = 256 * 1024
#: Largest batch message: 64 names of at most 255 bytes, and their separators.
MAX_MESSAGE = 64 * 1024
#: Header reads the helper has in flight at once (see prefetch_files).
HEADER_READERS = 4
#: Files warmed at the start of each subdirectory named in a batch, and the
#: most entries looked at to find them (see _warm_directory).
SUBDIR_FILES = 4
SUBDIR_SCAN = 32
#: How much the helper lowers its CPU priority below the daemon's.  On two
#: CPUs the reader, the daemon and this helper compete; the helper's work is
#: mostly waiting for the disk, and what CPU it needs can wait for the others.
#: Cold ``tar cf`` of the bench tree, alternating rounds: median 1.55 s at the
#: daemon's priority, 1.48 s at nice 10 (faster in 9 of 14); 1.32 and 1.26 s
#: (12 of 16).  The helper used 0.37-0.39 s of CPU per round.
NICENESS = 10
#: How long close() waits for the helper to finish its batch and exit.
EXIT_TIMEOUT = 5.0

_SEPARATOR = b"\0"


class Prefetcher:
    """The daemon's side: starts the helper and hands it batches, never waiting."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._process = process
        self._sock = sock
        self._ended = False
        #: Batches handed to the helper, and batches dropped for want of room.
        self.sent = 0
        self.dropped = 0

    @classmethod
    def start(cls) -> Prefetcher:
        """Start the helper process.  Raises OSError if it cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = start_helper("kmsfs.prefetch", [], stdin=theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        log.debug("prefetch helper started, pid %d", process.pid)
        return cls(process, ours)

    @property
    def pid(self) -> int:
        return self._process.pid

    def request(self, dir_fd: int, names: list[bytes]) -> bool:
        """Hand the helper a batch of names in the directory ``dir_fd``.

        Returns False, at once, if the batch was dropped: the socket is full,
        or the helper has ended (logged once; the mount goes on without it).
        """
        if self._ended or not any(names):
            return False  # (an empty message would read as EOF)
        try:
            socket.send_fds(self._sock, [_SEPARATOR.join(names)], [dir_fd], socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self.dropped += 1
            return False
        except OSError as exc:
            self._ended = True
            status = self._process.poll()
            log.warning("the prefetch helper (pid %d) has ended (%s, exit status %s); "
                        "files are no longer read ahead for this mount", self._process.pid,
                        errno.errorcode.get(exc.errno or 0, exc), status)
            return False
        self.sent += 1
        return True

    def stats(self) -> dict[str, object]:
        return {"helper_pid": None if self._ended else self._process.pid, "batches": self.sent,
                "dropped": self.dropped}

    def close(self) -> None:
        """Tell the helper to end (EOF), and wait for it."""
        self._ended = True
        self._sock.close()
        status = wait_for_helper(self._process, "prefetch helper", EXIT_TIMEOUT)
        if status != 0:
            log.warning("the prefetch helper (pid %d) ended with status %d", self._process.pid, status)


# ----------------------------------------------------------------------------- helper


def start_reading(fd: int, size: int = PREFETCH_BYTES) -> None:
    """Have the kernel start reading ``fd``'s first ``size`` bytes (at most PREFETCH_BYTES), without waiting."""
    try:
        os.posix_fadvise(fd, 0, min(size, PREFETCH_BYTES), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only


def _warm(fd: int, size: int) -> None:
    """Read ``fd``'s header, then start reading its data; close it."""
    try:
        try:
            os.getxattr(fd, HEADER_XATTR)
        except OSError:  # no header (yet), or no xattrs: nothing to warm
            pass
        start_reading(fd, size)
    finally:
        os.close(fd)


def _warm_directory(fd: int) -> None:
    """Warm the first SUBDIR_FILES regular files listed in the directory ``fd``; close it.

    A reader that goes through a tree in listing order (tar, cp -r, grep -r)
    enters a subdirectory when it gets to its name, and opens its first
    files right after listing it: nothing has warmed them, since no file of
    that directory was opened yet.  The order is the daemon's own, as both
    list the same backing directory.  At most SUBDIR_SCAN entries are looked
    at, so a huge directory costs one getdents call, not a full listing.
    """
    try:
        warmed = 0
        with os.scandir(fd) as entries:
            for scanned, entry in enumerate(entries):
                if warmed >= SUBDIR_FILES or scanned >= SUBDIR_SCAN:
                    break
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                opened = _open_checked(fd, os.fsencode(entry.name))
                if opened is None:
                    continue
                kind, file_fd, size = opened
                if kind != "file":  # replaced by a directory since the listing
                    os.close(file_fd)
                    continue
                _warm(file_fd, size)
                warmed += 1
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_checked(dir_fd: int, name: bytes) -> tuple[str, int, int] | None:
    """``name`` in ``dir_fd`` opened read-only if it is a non-empty regular file or a directory.

    Returns (kind, descriptor, size), kind "file" or "dir"; None for anything
    else or on an error.  Opened first without following anything (O_PATH,
    O_NOFOLLOW) and then reopened through that descriptor: the same inode,
    never a device or FIFO swapped in under the name meanwhile.
    """
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except (OSError, ValueError):  # gone, or not a name at all (empty, a NUL)
        return None
    try:
        st = os.fstat(path_fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            return "file", os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC), st.st_size
        if stat.S_ISDIR(st.st_mode):
            return "dir", os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), 0
        return None
    except OSError:
        return None
    finally:
        os.close(path_fd)


def prefetch_files(dir_fd: int, names: list[bytes], header_readers: Executor | None = None) -> None:
    """Bring headers and first data of the regular files among ``names`` into the page cache.

    For each file, its header is read and then its first PREFETCH_BYTES are
    asked for (WILLNEED: the kernel starts reading them, nobody waits).  A
    header can only be read by waiting for it, so ``header_readers`` (a
    thread pool) reads several at once.  For a subdirectory among ``names``,
    the first files it lists are warmed the same way (_warm_directory).
    Returns when all of it has been done.
    """
    pending: list[Future[None]] = []
    for name in names:
        opened = _open_checked(dir_fd, name)
        if opened is None:
            continue
        kind, fd, size = opened
        if kind == "dir":
            job: Callable[..., None] = _warm_directory
            args: tuple[int, ...] = (fd,)
        else:
            job, args = _warm, (fd, size)
        if header_readers is None:
            job(*args)
        else:
            pending.append(header_readers.submit(job, *args))
    futures_wait(pending)


def serve(sock: socket.socket) -> None:
    """The helper's loop: one batch per message, until the daemon closes its end."""
    with ThreadPoolExecutor(HEADER_READERS, thread_name_prefix="header-reader") as header_readers:
        while True:
            try:
                data, fds, flags, _address = socket.recv_fds(sock, MAX_MESSAGE, 1)
            except ConnectionResetError:
                return
            if not data and not fds:
                return  # EOF: the daemon is done
            try:
                # Anything but one descriptor and a whole message is not from the daemon.
                if len(fds) == 1 and not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                    prefetch_files(fds[0], data.split(_SEPARATOR), header_readers)
            finally:
                for fd in fds:
                    os.close(fd)


def main() -> None:
    # The daemon ends this helper by closing the socket, after its unmount;
    # a stray Ctrl-C or hang-up must not end it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.nice(NICENESS)
    serve(socket.socket(fileno=sys.stdin.fileno()))


if __name__ == "__main__":
    main()
