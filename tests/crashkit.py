"""Shared by the crash tests: child processes that report, and what a file may
look like after the daemon was killed in the middle of an operation."""

from __future__ import annotations

import errno
import subprocess
import sys

from kmsfs.format import DEFAULT_BLOCK_SIZE

B = DEFAULT_BLOCK_SIZE
#: The kernel's unit: writes reach the daemon in whole pages, which are not
#: block boundaries in format 2's plaintext.
PAGE = 4096

#: How a child may fail once the daemon is dead: the connection is gone; or,
#: after the lazy unmount, its path names the empty mountpoint directory; or
#: EIO from the kernel itself, which reads in a partial page before writing it
#: and reports that read's failure as EIO.  That the daemon never answered EIO
#: is checked on its log.
AFTER_KILL = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT, errno.EIO}


def spawn(script: str, *args: object, reports: bool = True) -> subprocess.Popen:
    """A child running ``script``; with ``reports`` its stdout is a pipe of report lines."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if reports else subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_stop(proc: subprocess.Popen, timeout: float = 15) -> str:
    """Wait for a child we started (it fails by itself once the mount is dead);
    kill it by pid if it does not end.  Returns its stderr (also when asked again)."""
    if hasattr(proc, "kmsfs_err"):
        return proc.kmsfs_err  # type: ignore[attr-defined]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    proc.kmsfs_err = err  # type: ignore[attr-defined]
    return err


def failed_only_by_the_kill(err: str) -> bool:
    """The child stopped because the daemon died (a short write, or an errno of AFTER_KILL)."""
    return err.startswith("SHORT ") or (err.startswith("ERRNO ") and int(err.split()[1]) in AFTER_KILL)


def check_partial(what: str, size: int, blocks: list[bytes | None], versions: list[bytes]) -> None:
    """The file written by the operation in flight at the kill: no block torn, the
    size between the versions (before and after the operation; a truncate loses
    nothing), and every byte from one of them.  Bytes, not blocks: the kernel
    cuts a write into requests at page boundaries."""
    lo = min(len(v) for v in versions)
    hi = max(len(v) for v in versions)
    assert lo <= size <= hi, f"{what}: size {size} outside [{lo}, {hi}]"
    torn = [i for i, b in enumerate(blocks) if b is None]
    assert not torn, f"{what}: blocks {torn} give EIO: the operation in flight at the kill tore them"
    assert_bytes_from_versions(what, b"".join(blocks), versions)  # type: ignore[arg-type]


def assert_bytes_from_versions(what: str, data: bytes, versions: list[bytes]) -> None:
    for start in range(0, len(data), PAGE):
        chunk = data[start:start + PAGE]
        if any(v[start:start + len(chunk)] == chunk for v in versions):
            continue
        for i in range(start, start + len(chunk)):
            assert any(i < len(v) and v[i] == data[i] for v in versions), \
                f"{what}: byte {i} (block {i // B}) is from no version"
