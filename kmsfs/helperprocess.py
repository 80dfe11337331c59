"""Starting and ending the daemon's long-lived helper processes.

The prefetch helper (kmsfs/prefetch.py), the client spin helper
(kmsfs/clientspin.py) and the decrypt helper (kmsfs/decrypthelper.py) run
for as long as a mount does.  They are started before the mount, so that
they cannot inherit /dev/fuse (a helper holding it would keep the mount
alive after the daemon's death), and they end when the daemon closes their
standard input.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The directory that holds the kmsfs package this daemon runs from.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def start_helper(
    module: str, args: list[str], stdin: Any, pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Run ``python -m module args``; raises OSError if it cannot start.

    ``stdin``: a descriptor, or an object with ``fileno()`` (a socket), for
    the helper's standard input; the daemon ends the helper by closing its end.
    """
    env = dict(os.environ)
    # The helper imports kmsfs from where this daemon did, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        # -P: not the working directory on sys.path; cwd "/": pin no directory.
        [sys.executable, "-P", "-m", module, *args], stdin=stdin, stdout=subprocess.DEVNULL, pass_fds=pass_fds,
        # A session of its own: no signal sent to the daemon's terminal reaches it.
        close_fds=True, start_new_session=True, cwd="/", env=env,
    )


def wait_for_helper(process: subprocess.Popen[bytes], what: str, timeout: float) -> int:
    """Wait for a helper told to end; kill it after ``timeout`` seconds.  Returns its exit status."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("the %s (pid %d) did not end within %.0f s; killing it", what, process.pid, timeout)
        process.kill()
        return process.wait()
