"""Fixtures for real mounts on real SoftHSM2 tokens.

Every mount runs the real daemon (``python -m kmsfs mount -f``) in its own
process.  Fixtures unmount and end exactly the processes they started, by
pid, even when the test fails.  Tests that need FUSE or SoftHSM2 skip with a
reason on a developer machine that lacks them, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent


def _missing_requirements() -> list[str]:
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 (Debian package fuse3)")
    if shutil.which("softhsm2-util") is None:
        missing.append("softhsm2-util (Debian package softhsm2)")
    try:
        from kmsfs.embedded_hsm import find_softhsm2_module

        find_softhsm2_module()
    except Exception:
        missing.append("libsofthsm2.so (Debian package softhsm2)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        missing.append("pyfuse3")
    return missing


def require_fuse_and_hsm() -> None:
    missing = _missing_requirements()
    if missing:
        message = "needs " + ", ".join(missing)
        if IN_CI:
            pytest.fail(f"CI=true and this test {message}: install them (scripts/bootstrap)", pytrace=False)
        pytest.skip(message)


def run_kmsfs(*args: str, env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kmsfs", *args], capture_output=True, text=True,
        env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kmsfs {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return any(line.split()[1] == target for line in fh if len(line.split()) > 1)


@dataclass
class Store:
    """An initialised store with its own embedded SoftHSM2 state directory."""

    root: Path
    backing: Path
    state_dir: Path
    env: dict[str, str]
    init_output: str
    mounts: list["Mount"] = field(default_factory=list)

    def mount(self, mountpoint: Path | None = None, *options: str, wait: bool = True) -> "Mount":
        mnt = mountpoint or self.root / f"mnt{len(self.mounts)}"
        mnt.mkdir(exist_ok=True)
        m = Mount(self, mnt, list(options))
        self.mounts.append(m)
        m.start(wait=wait)
        return m

    def kmsfs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_kmsfs(*args, env=self.env, check=check)


class Mount:
    """One daemon process serving one mountpoint."""

    def __init__(self, store: Store, path: Path, options: list[str]) -> None:
        self.store = store
        self.path = path
        self.options = options
        self.log_file = store.root / f"{path.name}.{len(store.mounts)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        cmd = [sys.executable, "-m", "kmsfs", "mount", "-f", "--debug", "--log-file", str(self.log_file),
               str(self.store.backing), str(self.path)]
        for option in self.options:
            cmd += ["-o", option]
        self.proc = subprocess.Popen(cmd, env=self.store.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_mounted(self.path):
                return
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"daemon exited with {self.proc.returncode} before mounting:\n{err}\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"{self.path} not mounted after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_file.read_text()
        except FileNotFoundError:
            return ""

    def unmount(self) -> None:
        """Clean unmount; asserts that the daemon exits by itself with status 0."""
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True, capture_output=True)
        assert self.proc is not None
        status = self.proc.wait(timeout=30)
        assert status == 0, f"daemon exited with {status}:\n{self.log()}"

    def kill9(self) -> None:
        """SIGKILL the daemon (by pid) and clear the dead mount."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def cleanup(self) -> None:
        """Whatever happened: no mount left behind, no process of ours left running."""
        if self.proc is None:
            return
        if is_mounted(self.path) and self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        if self.proc.stderr:
            self.proc.stderr.close()


#: Fields of .kmsfs/status that count activity rather than describe state.
#: Reading the status is activity too (it wakes the client spin helper), so
#: tests that check "nothing changed" compare the status without them.
STATUS_COUNTERS = ("open_files", "known_inodes", "hsm_calls", "dek_cache", "prefetch", "client_spin",
                   "decrypt_helper", "header_memo")


def status_state(raw: bytes) -> dict[str, Any]:
    """The parsed status without its counters."""
    return {k: v for k, v in json.loads(raw).items() if k not in STATUS_COUNTERS}


def make_store(root: Path, *init_args: str) -> Store:
    require_fuse_and_hsm()
    root.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(state)
    env["XDG_RUNTIME_DIR"] = str(root / "run")
    (root / "run").mkdir(mode=0o700, exist_ok=True)
    env.pop("SOFTHSM2_CONF", None)
    backing = root / "backing"
    result = run_kmsfs("init", str(backing), *init_args, env=env)
    return Store(root, backing, state / "kmsfs", env, result.stdout)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = make_store(tmp_path / "s")
    try:
        yield s
    finally:
        for m in s.mounts:
            m.cleanup()


@pytest.fixture
def mounted(store: Store) -> Iterator[Mount]:
    yield store.mount()


def backing_path(mount: Mount, name: str) -> Path:
    return mount.store.backing / name


def process_state(pid: int) -> str:
    """R (running), S (sleeping), T (stopped), Z, ... from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        data = fh.read()
    return data[data.rindex(")") + 2]


def process_gone(pid: int) -> bool:
    """Ended: no such process, or one not yet reaped by its new parent."""
    try:
        return process_state(pid) == "Z"
    except OSError:
        return True


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()
