"""More crashes (kill -9 of the daemon), always checked with ``kmsfs fsck``, and
eight processes at once against a serialised history.

test_crash.py kills the daemon under parallel writers and checks the data
model; test_lifecycle.py kills it during a rewrap.  Here:

* **Storms** (``writes``: eight processes doing pwrite/append/truncate/create
  on their own files; ``names``: eight processes creating, renaming over,
  unlinking and moving files and directories), killed after a random amount
  of work.  Each worker reports every operation that returned; the test
  replays the same deterministic generator as a model.  After the kill:
  ``kmsfs fsck`` on the unmounted store is clean, except possibly the file
  the operation in flight was writing (reported precisely if it ever
  happens); the store mounts again; every acknowledged operation survived
  (fsynced or not: only a kill of the whole machine loses unsynced writes);
  only the one operation in flight per worker may be missing or partial.
* **Writeback cache** (``-o writeback_cache``): what a kill can lose there,
  measured: acknowledged writes after a file's last fsync, block by block,
  never a byte before it, never a block that is a mix of two writes.
* **Rotation** (with concurrent creates of files under the rotating key and
  repeated rewraps), killed: fsck clean, the HSM holds every version that
  keys.json lists (plus at most the one being generated), every file
  readable, and the next rotation and rewrap work.
* **Key state changes** (Disabled/Enabled on several keys, with readers),
  killed: no CMK version is lost and no SoftHSM2 object file is empty
  (SoftHSM2 rewrites an object's file in place on every attribute change;
  kmsfs makes those changes in a helper process that outlives the daemon,
  see kmsfs/hsmchange.py); once the helper is done (keys.lock free, which
  mount and fsck wait for), keys.json and the HSM agree on every key, the
  one in flight included; files give EACCES (never EIO) while their key is
  disabled, fsck reports nothing but "key disabled", and writing ``Enabled``
  to the state brings everything back, after which fsck is clean.
* **Concurrency**: eight processes write, read, append, truncate and rename
  the same and different files while another rotates, rewraps, disables and
  enables a key.  Each operation takes a lock per name it touches and, under
  it, a number from one global sequence; replaying the merged log on a plain
  directory must give every result (data read, errno) and the final tree.
  And creates racing disables: a create refused with EACCES leaves no file.

Sizes scale with KMSFS_SOAK_SCALE (scripts/soak), seeds with KMSFS_SOAK_SEED.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import multiprocessing
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Mount, Store
from crashkit import (
    PAGE, assert_bytes_from_versions, check_partial, failed_only_by_the_kill, spawn, wait_stop,
)
from kmsfs.format import DEFAULT_BLOCK_SIZE
from test_lifecycle import REPO, create_key, key_dir, kpath, store_config, wait_rewrap, write_ctl

pytestmark = pytest.mark.mount

B = DEFAULT_BLOCK_SIZE
SCALE = max(1.0, float(os.environ.get("KMSFS_SOAK_SCALE", "1")))
SEED = int(os.environ.get("KMSFS_SOAK_SEED", "0"))


def scaled(n: float) -> int:
    return max(1, int(n * SCALE))


# ====================================================================== shared helpers


def fsck(store: Store) -> tuple[int, dict[str, Any]]:
    result = store.kmsfs("fsck", "--json", str(store.backing), check=False)
    try:
        report = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    report["stderr"] = result.stderr
    return result.returncode, report


class Reports:
    """Reads a child's report lines in a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    def finish(self) -> list[str]:
        self.thread.join(15)
        assert not self.thread.is_alive()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.lines


def daemon_errors(m: Mount, allowed: tuple[str, ...] = (), since: int = 0) -> list[str]:
    """ERROR lines and tracebacks in the daemon's log (from offset ``since``), but the allowed ones."""
    return [line for line in m.log()[since:].splitlines()
            if (" ERROR " in line or "Traceback" in line) and not any(a in line for a in allowed)]


def observe(path: Path) -> tuple[int, list[bytes | None]]:
    """Size and blocks of a file in the mount, None for a block that fails (EIO).

    A plain read first; only if it fails, block by block with O_DIRECT, so that
    readahead cannot fail a good block for its bad neighbour.
    """
    size = path.stat().st_size
    try:
        data = path.read_bytes()
    except OSError as exc:
        assert exc.errno == errno.EIO, f"{path}: {exc}"
    else:
        assert len(data) == size, f"{path}: st_size {size}, readable {len(data)}"
        return size, [data[i:i + B] for i in range(0, size, B)]
    buf = mmap.mmap(-1, B)
    blocks: list[bytes | None] = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(-(-size // B) + 1):  # one more: a torn fragment after the last block
            try:
                n = os.preadv(fd, [buf], i * B)
            except OSError as exc:
                assert exc.errno == errno.EIO, f"{path} block {i}: {exc}"
                blocks.append(None)
                continue
            if n:
                blocks.append(bytes(buf[:n]))
    finally:
        os.close(fd)
    assert None in blocks, f"{path}: EIO on a plain read, but every block reads"
    return size, blocks


def joined(blocks: list[bytes | None]) -> bytes | None:
    return None if None in blocks else b"".join(blocks)  # type: ignore[arg-type]


# ====================================================================== storms: generator and worker

# The operations of one storm worker, from a seeded generator that keeps its own
# model (every yielded operation is applied to it), so the test can replay it.
STORM_OPS = textwrap.dedent("""
    import random

    SIZES = [0, 1, 100, 4095, 4096, 4097, 8192, 20_000, 70_000, 300_000]

    def apply(files, dirs, op):
        kind = op[0]
        if kind == "create":
            files[op[1]] = bytearray(op[2])
        elif kind in ("pwrite", "append"):
            data = files[op[1]]
            off = len(data) if kind == "append" else op[2]
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off:off + len(op[3])] = op[3]
        elif kind == "truncate":
            data = files[op[1]]
            if op[2] < len(data):
                del data[op[2]:]
            else:
                data.extend(bytes(op[2] - len(data)))
        elif kind == "rename":
            files[op[2]] = files.pop(op[1])
        elif kind == "unlink":
            del files[op[1]]
        elif kind == "mkdir":
            dirs.add(op[1])
        elif kind == "rename_dir":
            dirs.discard(op[1])
            dirs.add(op[2])
            for name in [n for n in files if n.startswith(op[1] + "/")]:
                files[op[2] + name[len(op[1]):]] = files.pop(name)

    def storm_ops(seed, flavor):
        rng = random.Random(seed)
        files, dirs = {}, set()
        n = 0
        weights = {
            "writes": {"create": 2, "pwrite": 6, "append": 4, "truncate": 3, "rename": 1, "unlink": 0.3,
                       "mkdir": 0.2, "rename_dir": 0.1},
            "names": {"create": 6, "pwrite": 1, "append": 1, "truncate": 0.5, "rename": 6, "unlink": 2,
                      "mkdir": 1, "rename_dir": 1},
        }[flavor]
        kinds, w = zip(*weights.items())
        while True:
            n += 1
            kind = rng.choices(kinds, w)[0]
            names = sorted(files)
            if not names and kind not in ("create", "mkdir"):
                kind = "create"
            if kind == "create":
                where = rng.choice(sorted(dirs) + [""] * 3)
                name = f"{where}/f{n}" if where else f"f{n}"
                data = rng.randbytes(rng.choice(SIZES))
                chunks = []
                while sum(chunks) < len(data):
                    chunks.append(rng.choice([1000, 4096, 65536, 131072, 300_000]))
                op = ("create", name, data, chunks, rng.choice(["", "fsync", "fdatasync"]))
            elif kind == "pwrite":
                name = rng.choice(names)
                size = len(files[name])
                op = ("pwrite", name, rng.randrange(0, size + 3 * 4096 + 1), rng.randbytes(rng.choice(SIZES[1:])))
            elif kind == "append":
                op = ("append", rng.choice(names), None, rng.randbytes(rng.choice(SIZES[1:8])))
            elif kind == "truncate":
                name = rng.choice(names)
                op = ("truncate", name, rng.randrange(0, len(files[name]) + 20_000))
            elif kind == "rename":
                src = rng.choice(names)
                if rng.random() < 0.4 and len(names) > 1:  # replace an existing file, as editors save
                    dst = rng.choice([x for x in names if x != src])
                else:
                    where = rng.choice(sorted(dirs) + [""] * 2)
                    dst = f"{where}/r{n}" if where else f"r{n}"
                op = ("rename", src, dst)
            elif kind == "unlink":
                op = ("unlink", rng.choice(names))
            elif kind == "mkdir":
                op = ("mkdir", f"d{n}")
            else:
                if not dirs:
                    op = ("mkdir", f"d{n}")
                else:
                    op = ("rename_dir", rng.choice(sorted(dirs)), f"d{n}")
            yield op
            apply(files, dirs, op)
""")

STORM_WORKER = STORM_OPS + textwrap.dedent("""
    import os, sys
    top, seed, flavor = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class ShortWrite(Exception):
        pass

    def full(written, wanted):
        if written != wanted:
            raise ShortWrite(f"{written} of {wanted}")

    def p(name):
        return os.path.join(top, name)

    def run(op):
        kind = op[0]
        if kind == "create":
            _, name, data, chunks, sync = op
            fd = os.open(p(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                pos = 0
                for c in chunks:
                    piece = data[pos:pos + c]
                    full(os.write(fd, piece), len(piece))
                    pos += len(piece)
                if sync:
                    getattr(os, sync)(fd)
            finally:
                os.close(fd)
        elif kind == "pwrite":
            fd = os.open(p(op[1]), os.O_WRONLY)
            try:
                full(os.pwrite(fd, op[3], op[2]), len(op[3]))
            finally:
                os.close(fd)
        elif kind == "append":
            fd = os.open(p(op[1]), os.O_WRONLY | os.O_APPEND)
            try:
                full(os.write(fd, op[3]), len(op[3]))
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(p(op[1]), op[2])
        elif kind in ("rename", "rename_dir"):
            os.rename(p(op[1]), p(op[2]))
        elif kind == "unlink":
            os.unlink(p(op[1]))
        elif kind == "mkdir":
            os.mkdir(p(op[1]))

    try:
        for n, op in enumerate(storm_ops(seed, flavor)):
            run(op)
            print(n, flush=True)  # acknowledged
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
    except ShortWrite as exc:
        sys.stderr.write(f"SHORT {exc}\\n")
        sys.exit(3)
""")

STORM_READER = textwrap.dedent("""
    import os, sys
    top = sys.argv[1]

    def fail(exc):
        if not isinstance(exc, FileNotFoundError):  # removed meanwhile by a worker
            raise exc

    try:
        while True:
            os.stat(top)  # os.walk is silent about a top that is gone
            for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
                for name in filenames:
                    try:
                        with open(os.path.join(dirpath, name), "rb") as fh:
                            while fh.read(1 << 20):
                                pass
                    except FileNotFoundError:
                        pass
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")

_storm: dict[str, Any] = {}
exec(STORM_OPS, _storm)


def storm_model(seed: int, flavor: str, done: int) -> tuple[dict[str, bytearray], set[str], tuple]:
    """Files and directories after ``done`` acknowledged operations, and the next one."""
    files: dict[str, bytearray] = {}
    dirs: set[str] = set()
    ops = _storm["storm_ops"](seed, flavor)
    for _ in range(done):
        _storm["apply"](files, dirs, next(ops))
    return files, dirs, next(ops)


def walk_mount(top: Path) -> tuple[dict[str, tuple[int, list[bytes | None]]], set[str]]:
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for d in dirnames:
            dirs.add(d if rel == "." else f"{rel}/{d}")
        for name in filenames:
            files[name if rel == "." else f"{rel}/{name}"] = observe(Path(dirpath) / name)
    return files, dirs


def check_storm_worker(what: str, observed: dict[str, tuple[int, list[bytes | None]]], observed_dirs: set[str],
                       before: dict[str, bytearray], dirs: set[str], op: tuple) -> None:
    """The worker's tree after the kill is the model of its acknowledged operations,
    with the operation in flight done, not done, or (for writes) partly done.
    """
    after = {k: bytearray(v) for k, v in before.items()}
    after_dirs = set(dirs)
    _storm["apply"](after, after_dirs, op)
    kind = op[0]
    assert observed_dirs in (dirs, after_dirs), f"{what}: directories {sorted(observed_dirs)} (in flight: {op[:2]})"
    if kind in ("create", "pwrite", "append", "truncate"):
        name = op[1]
        expected_names = set(before) | {name}
        assert set(observed) in (set(before), expected_names), \
            f"{what}: names {sorted(set(observed) ^ expected_names)} differ (in flight: {kind} {name})"
        for rel, (size, blocks) in observed.items():
            if rel == name:
                versions = [bytes(before.get(name, b"")), bytes(after[name])]
                check_partial(f"{what}/{rel} ({kind} in flight)", size, blocks, versions)
            else:
                assert joined(blocks) == bytes(before[rel]), f"{what}/{rel}: acknowledged data lost or changed"
    else:
        # Renames, unlinks and mkdir are atomic in the backing filesystem.
        for model in (before, after):
            if set(observed) == set(model) and all(joined(observed[r][1]) == bytes(model[r]) for r in model):
                break
        else:
            missing = sorted(set(before) ^ set(observed))
            raise AssertionError(f"{what}: tree matches neither before nor after {op[:3]} (differs in {missing[:10]})")


def run_storm_round(store: Store, m: Mount, top: Path, flavor: str, nworkers: int, seed: int,
                    kill_after: int, slack: float) -> tuple[Mount, int]:
    """One round: workers and a reader, kill -9, fsck, remount, check.  Returns the new
    mount and how many operations were acknowledged."""
    top.mkdir()
    since = len(m.log())  # this mount also checked the round before
    workers = []
    for i in range(nworkers):
        (top / f"w{i}").mkdir()
        proc = spawn(STORM_WORKER, top / f"w{i}", seed * 100 + i, flavor)
        workers.append((proc, Reports(proc)))
    reader = spawn(STORM_READER, top, reports=False)
    killed = None
    try:
        deadline = time.monotonic() + 60
        while sum(len(r.lines) for _, r in workers) < kill_after:
            assert time.monotonic() < deadline, "the workers made no progress"
            time.sleep(0.005)
        time.sleep(slack)
        for proc, _ in workers:
            assert proc.poll() is None, f"a worker died before the kill:\n{wait_stop(proc)}"
        killed = m
        m.kill9()
    finally:
        grace = 15 if killed else 0.1  # the test failed before the kill: end them now
        errors = [wait_stop(proc, grace) for proc, _ in workers]
        reader_err = wait_stop(reader, grace)
        done = [len(r.finish()) for _, r in workers]
    for i, err in enumerate(errors + [reader_err]):
        assert failed_only_by_the_kill(err), f"child {i} failed with: {err}\n" + "\n".join(daemon_errors(killed, since=since))
    assert not daemon_errors(killed, since=since), "\n".join(daemon_errors(killed, since=since))[-4000:]

    # fsck is clean right after the crash, even for the files being written.
    code, report = fsck(store)
    assert code == 0, report

    m = store.mount(m.path)
    for i in range(nworkers):
        before, dirs, op = storm_model(seed * 100 + i, flavor, done[i])
        observed, observed_dirs = walk_mount(top / f"w{i}")
        check_storm_worker(f"round {top.name} worker {i} after {done[i]} ops", observed, observed_dirs,
                           before, dirs, op)
    # The store is fully usable after the crash.
    (top / "after").write_bytes(b"after the crash" * 500)
    assert (top / "after").read_bytes() == b"after the crash" * 500
    return m, sum(done)


STORMS = {"writes": 8, "names": 8}


@pytest.mark.parametrize("flavor", sorted(STORMS))
def test_kill9_during_a_storm_leaves_a_clean_store_and_every_acknowledged_operation(store, flavor):
    rng = random.Random(SEED * 7 + len(flavor))
    m = store.mount()
    acked = 0
    rounds = scaled(2)
    for round_no in range(rounds):
        kill_after = rng.choice([5, 40, 150, 400]) * (1 if round_no else 0) + rng.randrange(1, 30)
        m, done = run_storm_round(store, m, m.path / f"round{round_no}", flavor, scaled(STORMS[flavor]),
                                              SEED * 1000 + round_no, scaled(kill_after), rng.random() * 0.1)
        acked += done
        print(f"{flavor} round {round_no}: killed after {done} acknowledged operations")
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report
    assert acked >= rounds


# ====================================================================== writeback cache: what can be lost

WB_OPS = textwrap.dedent("""
    import random

    WB_BLOCKS = 48

    def wb_ops(seed):
        \"\"\"Writes into a file of WB_BLOCKS blocks (its size never changes), and now and then an fsync.\"\"\"
        rng = random.Random(seed)
        while True:
            if rng.random() < 0.15:
                yield ("fsync",)
            else:
                off = rng.randrange(0, WB_BLOCKS * 4096 - 1)
                n = rng.randint(1, min(3 * 4096, WB_BLOCKS * 4096 - off))
                yield ("pwrite", off, rng.randbytes(n))
""")

WB_WORKER = WB_OPS + textwrap.dedent("""
    import os, random, sys
    path, seed = sys.argv[1], int(sys.argv[2])
    try:
        fd = os.open(path, os.O_RDWR)
        for n, op in enumerate(wb_ops(seed)):
            if op[0] == "fsync":
                os.fsync(fd)
            else:
                written = os.pwrite(fd, op[2], op[1])
                if written != len(op[2]):  # the daemon died inside this write(2)
                    sys.stderr.write(f"SHORT {written} of {len(op[2])}\\n")
                    sys.exit(3)
            print(n, flush=True)  # acknowledged (an fsync: everything before it is durable)
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")

_wb: dict[str, Any] = {}
exec(WB_OPS, _wb)


def test_kill9_with_writeback_cache_loses_only_writes_after_the_last_fsync(store):
    """With ``-o writeback_cache`` acknowledged writes may sit in the kernel's page
    cache of the mount: a kill -9 loses those not yet written back, but never a
    byte before the last fsync, never leaves a torn (unreadable) block, and
    every byte is from a version the program wrote since its last fsync.  The
    kernel writes back whole pages; a page is checked as a unit first, byte by
    byte when a kill between two requests split it (pages and format-2 blocks
    are not aligned in plaintext).

    Without it (the default), write(2) returns only once the daemon wrote the
    backing file, so a kill loses no acknowledged write at all: the storm tests
    and test_crash.py check that.
    """
    nworkers = scaled(4)
    size = _wb["WB_BLOCKS"] * PAGE
    m = store.mount(None, "writeback_cache")
    initial = {i: random.Random(f"wb{SEED}-{i}").randbytes(size) for i in range(nworkers)}
    for i, data in initial.items():
        with open(m.path / f"wb{i}", "wb") as fh:
            fh.write(data)
            os.fsync(fh.fileno())
    workers = [spawn(WB_WORKER, m.path / f"wb{i}", SEED * 100 + i) for i in range(nworkers)]
    reports = [Reports(p) for p in workers]
    killed = None
    try:
        deadline = time.monotonic() + 60
        while sum(len(r.lines) for r in reports) < scaled(200):
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        for p in workers:
            assert p.poll() is None, wait_stop(p)
        killed = m
        m.kill9()
    finally:
        errs = [wait_stop(p, 15 if killed else 0.1) for p in workers]
        done = [len(r.finish()) for r in reports]
    for err in errs:
        assert failed_only_by_the_kill(err), err

    code, report = fsck(store)
    assert code == 0, report
    m = store.mount(m.path)
    lost_pages = dirty_pages = 0
    for i in range(nworkers):
        ops = _wb["wb_ops"](SEED * 100 + i)
        acked_ops = [next(ops) for _ in range(done[i])]
        in_flight = next(ops)
        history = [bytearray(initial[i])]  # the file after each write since the last fsync
        for op in acked_ops + [in_flight]:
            if op[0] == "fsync":
                if op is not in_flight:
                    history = [history[-1]]  # durable from here on
                continue
            if op is in_flight:
                newest_acked = history[-1]
            after = bytearray(history[-1])
            after[op[1]:op[1] + len(op[2])] = op[2]
            history.append(after)
        if in_flight[0] == "fsync":
            newest_acked = history[-1]
        size_seen, blocks = observe(m.path / f"wb{i}")
        assert size_seen == size, f"wb{i}: size {size_seen}"
        assert None not in blocks, f"wb{i}: blocks {[b for b, x in enumerate(blocks) if x is None]} torn"
        data = b"".join(blocks)  # type: ignore[arg-type]
        for p in range(0, size // PAGE):
            page = data[p * PAGE:(p + 1) * PAGE]
            versions = [bytes(h[p * PAGE:(p + 1) * PAGE]) for h in history]
            if page not in versions:
                assert_bytes_from_versions(f"wb{i} page {p}", page, versions)
            if len(set(versions)) > 1:
                dirty_pages += 1
                if page != bytes(newest_acked[p * PAGE:(p + 1) * PAGE]) and page != versions[-1]:
                    lost_pages += 1
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report
    print(f"writeback cache: {sum(done)} operations acknowledged; of {dirty_pages} pages written after "
          f"their file's last fsync, {lost_pages} hold older content")


# ====================================================================== rotation

ROTATOR = textwrap.dedent("""
    import os, sys
    rotate = sys.argv[1]
    try:
        n = 0
        while True:
            fd = os.open(rotate, os.O_WRONLY)
            try:
                os.write(fd, b"now")
            finally:
                os.close(fd)
            n += 1
            print(n, flush=True)
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")

REWRAPPER = textwrap.dedent("""
    import errno, os, sys, time
    rewrap = sys.argv[1]
    try:
        while True:
            fd = os.open(rewrap, os.O_WRONLY)
            try:
                os.write(fd, b"start")
                print("started", flush=True)
            except OSError as exc:
                if exc.errno != errno.EBUSY:  # one is running already
                    raise
            finally:
                os.close(fd)
            time.sleep(0.02)
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")

CREATOR = textwrap.dedent("""
    import hashlib, os, random, sys
    top, seed, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = random.Random(seed)
    try:
        i = 0
        while True:
            name = f"{prefix}{i:05d}"
            data = rng.randbytes(rng.choice([0, 10, 4096, 5000, 30_000]))
            with open(os.path.join(top, name), "xb") as fh:
                fh.write(data)
            print(name, hashlib.sha256(data).hexdigest(), flush=True)
            i += 1
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")


HSM_PROBE = r"""
import json, sys, uuid
from pathlib import Path
import pkcs11
from pkcs11 import Attribute, ObjectClass
from kmsfs.store import load_config

uri = load_config(Path(sys.argv[1])).uri()
token = pkcs11.lib(uri.module_path).get_token(token_label=uri.token)
found = {}
with token.open(user_pin=uri.read_pin()) as session:
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        oid = bytes(obj[Attribute.ID])
        if len(oid) == 20:
            flags = {"encrypt": bool(obj[Attribute.ENCRYPT]), "decrypt": bool(obj[Attribute.DECRYPT])}
            found.setdefault(str(uuid.UUID(bytes=oid[:16])), {})[int.from_bytes(oid[16:], "big")] = flags
print(json.dumps(found))
"""


def hsm_keys(store: Store) -> dict[str, dict[int, dict[str, bool]]]:
    """Every CMK version in the HSM with its encrypt/decrypt flags, seen by a fresh process."""
    env = {**store.env, **store_config(store)["hsm"]["env"]}
    result = subprocess.run([sys.executable, "-c", HSM_PROBE, str(store.backing)],
                            capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return {k: {int(v): f for v, f in versions.items()} for k, versions in json.loads(result.stdout).items()}


def registry(store: Store) -> dict[str, dict[str, Any]]:
    data = json.loads((store.backing / ".kmsfs.d" / "keys.json").read_bytes())
    return {k["Alias"]: k for k in data["keys"]}


def header_version(store: Store, rel: str) -> tuple[str, int]:
    from kmsfs.format import parse_header
    import uuid

    header = parse_header(os.getxattr(store.backing / rel, "user.kmsfs"))
    return str(uuid.UUID(bytes=header.key_id)), header.key_version


def test_kill9_during_rotation_with_creates_and_rewraps(store):
    rng = random.Random(SEED + 11)
    m = store.mount()
    meta = create_key(m, "proj")
    d = key_dir(m, "p", "proj")
    for i in range(scaled(30)):
        (d / f"old{i}").write_bytes(f"old file {i}".encode() * 50)
    files: dict[str, str] = {f"old{i}": hashlib.sha256(f"old file {i}".encode() * 50).hexdigest()
                             for i in range(scaled(30))}
    rounds = scaled(2)
    for round_no in range(rounds):
        before = registry(store)["proj"]["Versions"]
        since = len(m.log())
        rotator = spawn(ROTATOR, kpath(m, "proj", "rotate"))
        rewrapper = spawn(REWRAPPER, kpath(m, "proj", "rewrap"))
        creator = spawn(CREATOR, d, SEED * 100 + round_no, f"r{round_no}c")
        reports = {name: Reports(p) for name, p in (("rotate", rotator), ("rewrap", rewrapper), ("create", creator))}
        killed = None
        try:
            target = rng.randrange(1, scaled(12))
            deadline = time.monotonic() + 60
            while len(reports["rotate"].lines) < target:
                assert time.monotonic() < deadline, "no rotations"
                time.sleep(0.005)
            time.sleep(rng.random() * 0.05)
            for p in (rotator, rewrapper, creator):
                assert p.poll() is None, wait_stop(p)
            killed = m
            m.kill9()
        finally:
            errs = {name: wait_stop(r.proc, 15 if killed else 0.1) for name, r in reports.items()}
            lines = {name: r.finish() for name, r in reports.items()}
        for name, err in errs.items():
            assert failed_only_by_the_kill(err), f"{name}: {err}"
        assert not daemon_errors(killed, ("rewrap of",), since), "\n".join(daemon_errors(killed, since=since))[-3000:]
        rotations = len(lines["rotate"])
        created = dict(line.split() for line in lines["create"])
        in_flight_file = f"r{round_no}c{len(created):05d}"

        # keys.json lists every acknowledged rotation, plus at most the one in flight;
        # the HSM has every listed version, plus at most the one being generated.
        record = registry(store)["proj"]
        versions = record["Versions"]
        assert versions[:len(before)] == before and versions == list(range(1, len(versions) + 1))
        assert len(before) + rotations <= len(versions) <= len(before) + rotations + 1, (before, rotations, versions)
        assert record["CurrentVersion"] == versions[-1]
        hsm = hsm_keys(store)[meta["KeyId"]]
        assert sorted(hsm) in (versions, versions + [versions[-1] + 1]), (sorted(hsm), versions)
        assert all(hsm[v]["encrypt"] and hsm[v]["decrypt"] for v in versions)

        code, report = fsck(store)
        assert code == 0, report  # the create in flight too: absent, empty or complete
        m = store.mount(m.path)
        files.update(created)
        for name, digest in files.items():
            data = (d / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, name
            key_id, version = header_version(store, f"p/{name}")
            assert key_id == meta["KeyId"] and version in versions, (name, version)
        leftover = set(os.listdir(d)) - set(files)
        assert leftover <= {in_flight_file}, leftover
        for name in leftover:  # the create in flight: absent, empty, or written
            os.unlink(d / name)
        # The next rotation works, even over a version left in the HSM by the kill.
        write_ctl(kpath(m, "proj", "rotate"), "now")
        assert registry(store)["proj"]["Versions"] == versions + [versions[-1] + 1]
        assert sorted(hsm_keys(store)[meta["KeyId"]]) == versions + [versions[-1] + 1]
    # A rewrap finishes the job on the last version.
    write_ctl(kpath(m, "proj", "rewrap"), "start")
    progress = wait_rewrap(m, "proj")
    assert progress["state"] == "done" and progress["failed"] == 0, progress
    current = registry(store)["proj"]["CurrentVersion"]
    for name, digest in files.items():
        assert header_version(store, f"p/{name}")[1] == current
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report


# ====================================================================== key state changes

STATE_CHANGER = textwrap.dedent("""
    import os, random, sys
    keys_dir, seed, aliases = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    rng = random.Random(seed)
    try:
        while True:
            alias = rng.choice(aliases)
            state = rng.choice(["Disabled", "Enabled"])
            print("START", alias, state, flush=True)
            fd = os.open(os.path.join(keys_dir, alias, "state"), os.O_WRONLY)
            try:
                os.write(fd, state.encode())
            finally:
                os.close(fd)
            print("DONE", alias, state, flush=True)
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")

STATE_READER = textwrap.dedent("""
    import errno, os, sys
    top = sys.argv[1]

    def fail(exc):
        raise exc

    try:
        while True:
            os.stat(top)  # os.walk is silent about a top that is gone
            for dirpath, _, filenames in os.walk(top, onerror=fail):
                for name in filenames:
                    try:
                        with open(os.path.join(dirpath, name), "rb") as fh:
                            fh.read()
                    except PermissionError:
                        pass  # its key is disabled: EACCES, never EIO
    except OSError as exc:
        sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
        sys.exit(2)
""")


def expected_fsck_damage(store: Store, contents: dict[str, bytes], metas: dict[str, dict], reg: dict[str, dict],
                         hsm_all: dict[str, dict[int, dict[str, bool]]]) -> dict[str, str]:
    """What fsck must report for each file, from keys.json and the HSM's own flags."""
    expected = {}
    for rel in contents:
        alias = rel.split("/")[0]
        key_id, version = header_version(store, rel)
        flags = hsm_all.get(key_id, {}).get(version)
        if reg[alias]["KeyState"] != "Enabled":
            expected[rel] = "key disabled"  # checked first, before the HSM is asked
        elif flags is None:
            expected[rel] = "destroyed key"  # its material is gone from the HSM
        elif not flags["decrypt"]:
            expected[rel] = "key disabled"
    return expected


def helper_in_flight(log: str) -> bool:
    """Whether the daemon's log shows an HSM helper started and not yet answered."""
    started = re.findall(r"HSM helper pid (\d+) started", log)
    return bool(started) and f"HSM helper pid {started[-1]} done" not in log


def test_kill9_during_key_state_changes(store):
    """Disable and enable keys in a tight loop (with readers), kill -9, check, repair.

    SoftHSM2's file backend rewrites a key's object file in place (truncate,
    then write) for every change of its attributes; a kill in between used to
    destroy that CMK version.  The change now runs in a helper process that
    the kill does not stop: no version may be lost, no object file be empty,
    and after the helper is done keys.json and the HSM agree on every key.
    Most kills land while a helper runs (it is most of a state change's time);
    the test says how many did.
    """
    rng = random.Random(SEED + 23)
    m = store.mount()
    aliases = [f"k{i}" for i in range(4)]
    metas = {}
    contents: dict[str, bytes] = {}
    for alias in aliases:
        metas[alias] = create_key(m, alias)
        if alias in ("k1", "k3"):
            write_ctl(kpath(m, alias, "rotate"), "now")  # two versions: two HSM objects to switch
        d = key_dir(m, alias, alias)
        for i in range(3):
            data = os.urandom(rng.choice([10, 5000, 20_000]))
            (d / f"f{i}").write_bytes(data)
            contents[f"{alias}/f{i}"] = data
        if alias in ("k1", "k3"):
            write_ctl(kpath(m, alias, "rotate"), "now")
            (d / "newest").write_bytes(b"on the newest version")
            contents[f"{alias}/newest"] = b"on the newest version"
    helper_hits = 0  # rounds whose kill landed while a helper was working
    rounds = scaled(2)
    for round_no in range(rounds):
        since = len(m.log())
        changer = spawn(STATE_CHANGER, m.path / ".kmsfs" / "keys", SEED * 100 + round_no, ",".join(aliases))
        readers = [spawn(STATE_READER, m.path / a, reports=False) for a in aliases]
        changes = Reports(changer)
        killed = None
        try:
            target = rng.randrange(2, scaled(40))
            deadline = time.monotonic() + 60
            while sum(1 for line in changes.lines if line.startswith("DONE")) < target:
                assert time.monotonic() < deadline, "no state changes"
                time.sleep(0.002)
            time.sleep(rng.random() * 0.03)
            for p in [changer, *readers]:
                assert p.poll() is None, wait_stop(p)
            killed = m
            m.kill9()
        finally:
            errs = [wait_stop(p, 15 if killed else 0.1) for p in [changer, *readers]]
            lines = changes.finish()
        for err in errs:
            assert failed_only_by_the_kill(err), err
        allowed = ("is Disabled", "refuses to decrypt")
        assert not daemon_errors(killed, allowed, since), "\n".join(daemon_errors(killed, allowed, since))[-3000:]
        helper_hits += helper_in_flight(killed.log()[since:])
        # A helper still at work holds keys.lock; look at the store as mount and fsck do, after it.
        from kmsfs.keyregistry import key_changes_settled

        with key_changes_settled(store.backing, timeout=60):
            pass

        # What was acknowledged is in keys.json; the HSM agrees, but for the key in flight.
        acked: dict[str, str] = {}
        in_flight = None
        for line in lines:
            word, alias, state = line.split()
            if word == "DONE":
                acked[alias] = state
                in_flight = None
            else:
                in_flight = (alias, state)
        reg = registry(store)
        hsm_all = hsm_keys(store)
        # No CMK version is lost, and no SoftHSM2 object file was left empty.
        empty = sorted(p.name for p in (store.state_dir / "tokens").rglob("*.object") if p.stat().st_size == 0)
        assert not empty, f"round {round_no}: empty SoftHSM2 object files {empty} (in flight: {in_flight})"
        for alias in aliases:
            gone = sorted(set(reg[alias]["Versions"]) - set(hsm_all.get(metas[alias]["KeyId"], {})))
            assert not gone, f"round {round_no}: CMK {alias} lost versions {gone} (in flight: {in_flight})"
        for alias in aliases:
            state = reg[alias]["KeyState"]
            usable = {v: f["encrypt"] and f["decrypt"] for v, f in hsm_all.get(metas[alias]["KeyId"], {}).items()}
            assert sorted(usable) == sorted(reg[alias]["Versions"])
            if in_flight and in_flight[0] == alias:
                # Not started, or finished by the helper after the kill: either state.
                assert state in (acked.get(alias, "Enabled"), in_flight[1]), (alias, state, in_flight)
            else:
                # Every round starts with all keys Enabled (the previous round repaired them).
                assert state == acked.get(alias, "Enabled"), (alias, state, acked)
            # keys.json and the HSM agree, the key in flight included.
            assert all(u == (state == "Enabled") for u in usable.values()), (alias, state, usable, in_flight)

        # fsck reports exactly the files whose key cannot be used: "key disabled".
        code, report = fsck(store)
        expected = expected_fsck_damage(store, contents, metas, reg, hsm_all)
        assert code == (4 if expected else 0), report
        assert {x["path"]: x["cause"] for x in report.get("damaged", [])} == expected, report

        m = store.mount(m.path)
        for rel, data in contents.items():
            try:
                got = (m.path / rel).read_bytes()
            except OSError as exc:
                # EACCES while its key is disabled; never EIO.
                assert rel in expected and exc.errno == errno.EACCES, (rel, exc, expected.get(rel))
            else:
                assert rel not in expected and got == data, rel
        # Enable every key again for the next round.
        for alias in aliases:
            write_ctl(kpath(m, alias, "state"), "Enabled")
        hsm_all = hsm_keys(store)
        for rel, data in contents.items():
            assert (m.path / rel).read_bytes() == data, rel
        for alias in aliases:
            assert all(f["encrypt"] and f["decrypt"] for f in hsm_all.get(metas[alias]["KeyId"], {}).values())
    m.unmount()
    code, report = fsck(store)
    assert code == 0 and not report.get("damaged"), report
    print(f"kill -9 during key state changes: {rounds} rounds, {helper_hits} killed while a helper was working")


# ====================================================================== concurrency vs a serialised history

#: Shared names (every worker uses them) and private ones, in a directory under
#: the default key and one under the key "proj", which gets disabled and enabled.
DIRS = {"a": None, "p": "proj"}
SHARED = [f"{d}/s{i}" for d in DIRS for i in range(3)]


def private(worker: int) -> list[str]:
    return [f"{d}/w{worker}" for d in DIRS]


def all_names(nworkers: int) -> list[str]:
    return SHARED + [n for w in range(nworkers) for n in private(w)]


def _do(top: str, op: tuple) -> tuple:
    """Run one file operation; the result as it is logged and compared."""
    kind = op[0]
    path = os.path.join(top, op[1])
    try:
        if kind == "write":
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                data = random.Random(op[3]).randbytes(op[4])
                assert os.pwrite(fd, data, op[2]) == len(data)
            finally:
                os.close(fd)
        elif kind == "append":
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                data = random.Random(op[2]).randbytes(op[3])
                assert os.write(fd, data) == len(data)
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(path, op[2])
        elif kind == "read":
            with open(path, "rb") as fh:
                data = fh.read()
            return ("ok", len(data), hashlib.sha256(data).hexdigest())
        elif kind == "rename":
            os.rename(path, os.path.join(top, op[2]))
        elif kind == "unlink":
            os.unlink(path)
    except OSError as exc:
        return ("err", exc.errno)
    return ("ok",)


def _names_of(op: tuple) -> list[str]:
    return sorted({op[1], op[2]}) if op[0] == "rename" else [op[1]]


def _gen_op(rng: random.Random, worker: int) -> tuple:
    names = SHARED + private(worker)
    name = rng.choice(names) if rng.random() < 0.4 else rng.choice(SHARED)
    kind = rng.choices(["write", "append", "truncate", "read", "rename", "unlink"], [6, 4, 2, 5, 3, 1])[0]
    if kind == "write":
        return ("write", name, rng.choice([0, rng.randrange(0, 40_000)]), rng.randrange(1 << 30),
                rng.choice([1, 100, 4096, 5000, 20_000, 70_000]))
    if kind == "append":
        return ("append", name, rng.randrange(1 << 30), rng.choice([1, 77, 4096, 10_000]))
    if kind == "truncate":
        return ("truncate", name, rng.choice([0, rng.randrange(0, 50_000)]))
    if kind == "rename":
        return ("rename", name, rng.choice([n for n in names if n != name]))
    return (kind, name)


def _conc_worker(top: str, worker: int, nops: int, seed: int, locks: dict, seq: Any, log_path: str) -> None:
    rng = random.Random(seed)
    with open(log_path, "w") as log:
        for _ in range(nops):
            op = _gen_op(rng, worker)
            held = [locks[n] for n in _names_of(op)]
            for lock in held:
                lock.acquire()
            try:
                with seq.get_lock():
                    number = seq.value
                    seq.value += 1
                result = _do(top, op)
            finally:
                for lock in reversed(held):
                    lock.release()
            log.write(json.dumps([number, worker, list(op), list(result)]) + "\n")
            log.flush()
    os._exit(0)


def _conc_controller(top: str, nworkers: int, seed: int, locks: dict, seq: Any, log_path: str, stop: Any) -> None:
    """Rotate, rewrap, disable and enable keys through the control files.

    A disable changes what every later operation on a file under "proj" does,
    wherever the file was renamed to: it takes every name lock, in order, like
    any operation.  Rotations and rewraps change no file's content or result.
    """
    rng = random.Random(seed)
    ctl = os.path.join(top, ".kmsfs", "keys")
    names = sorted(locks)
    counts = {"rotate": 0, "rewrap": 0, "busy": 0, "disable": 0}
    with open(log_path, "w") as log:
        while not stop.is_set():
            action = rng.choice(["rotate", "rewrap", "disable", "rotate-default"])
            if action == "disable":
                for state in ("Disabled", "Enabled"):
                    for n in names:
                        locks[n].acquire()
                    try:
                        with seq.get_lock():
                            number = seq.value
                            seq.value += 1
                        fd = os.open(os.path.join(ctl, "proj", "state"), os.O_WRONLY)
                        try:
                            os.write(fd, state.encode())
                        finally:
                            os.close(fd)
                    finally:
                        for n in reversed(names):
                            locks[n].release()
                    log.write(json.dumps([number, -1, ["state", state], ["ok"]]) + "\n")
                    log.flush()
                    time.sleep(rng.random() * 0.05)  # operations on "proj" files meanwhile get EACCES
                counts["disable"] += 1
            elif action == "rewrap":
                fd = os.open(os.path.join(ctl, "proj", "rewrap"), os.O_WRONLY)
                try:
                    os.write(fd, b"start")
                    counts["rewrap"] += 1
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    counts["busy"] += 1
                finally:
                    os.close(fd)
            else:
                alias = "proj" if action == "rotate" else "kmsfs-default"
                fd = os.open(os.path.join(ctl, alias, "rotate"), os.O_WRONLY)
                try:
                    os.write(fd, b"now")
                finally:
                    os.close(fd)
                counts["rotate"] += 1
            time.sleep(rng.random() * 0.02)
        log.write(json.dumps([-1, -1, ["counts", counts], ["ok"]]) + "\n")
    os._exit(0)


def _replay(plain: Path, entries: list[list]) -> None:
    """Apply the merged log to a plain directory, checking every logged result."""
    key_of: dict[str, str | None] = {}  # which key each existing file is under
    disabled = False
    for number, worker, op, result in entries:
        op, result = tuple(op), tuple(result)
        what = f"#{number} worker {worker} {op[:3]}"
        if op[0] == "state":
            disabled = op[1] == "Disabled"
            continue
        name = op[1]
        exists = (plain / name).exists()
        if op[0] in ("write", "append", "truncate", "read"):
            key = key_of.get(name) if exists else DIRS[name.split("/")[0]]
            needs_key = exists or op[0] in ("write", "append")
            if needs_key and key == "proj" and disabled:
                assert result == ("err", errno.EACCES), f"{what}: got {result}, expected EACCES (proj disabled)"
                continue
        expected = _do(str(plain), op)
        assert result == expected, f"{what}: kmsfs gave {result}, a plain directory {expected}"
        if expected[0] == "ok":
            if op[0] in ("write", "append") and not exists:
                key_of[name] = DIRS[name.split("/")[0]]
            elif op[0] == "rename" and op[1] != op[2]:
                key_of[op[2]] = key_of.pop(op[1])
            elif op[0] == "unlink":
                key_of.pop(name)


def test_eight_processes_and_key_changes_match_a_serialised_history(store, tmp_path):
    nworkers = 8
    nops = scaled(40)
    m = store.mount()
    create_key(m, "proj")
    key_dir(m, "p", "proj")
    (m.path / "a").mkdir()
    plain = tmp_path / "plain"
    for d in DIRS:
        (plain / d).mkdir(parents=True)
    names = all_names(nworkers)
    ctx = multiprocessing.get_context("fork")
    locks = {n: ctx.Lock() for n in names}
    seq = ctx.Value("q", 0)
    stop = ctx.Event()
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = [ctx.Process(target=_conc_worker, args=(str(m.path), w, nops, SEED * 1000 + w, locks, seq,
                                                      str(logs / f"w{w}.jsonl")))
               for w in range(nworkers)]
    controller = ctx.Process(target=_conc_controller, args=(str(m.path), nworkers, SEED, locks, seq,
                                                            str(logs / "controller.jsonl"), stop))
    started = time.monotonic()
    for p in [controller, *workers]:
        p.start()
    try:
        budget = 60 * SCALE
        for p in workers:
            p.join(max(0.1, budget - (time.monotonic() - started)))
        hung = [i for i, p in enumerate(workers) if p.is_alive()]
        stop.set()
        controller.join(30)
        assert not hung and not controller.is_alive(), \
            f"deadlock? workers {hung} still running after {budget:.0f}s\n" + m.log()[-3000:]
        assert all(p.exitcode == 0 for p in workers), [p.exitcode for p in workers]
        assert controller.exitcode == 0, controller.exitcode
    finally:
        for p in [*workers, controller]:
            if p.is_alive():
                p.kill()  # by pid: only what this test started
                p.join(10)
    entries = []
    for path in logs.iterdir():
        entries += [json.loads(line) for line in path.read_text().splitlines()]
    counts = [e for e in entries if e[2][0] == "counts"][0][2][1]
    entries = sorted((e for e in entries if e[0] >= 0), key=lambda e: e[0])
    assert [e[0] for e in entries] == list(range(len(entries))), "the sequence has gaps"
    assert len([e for e in entries if e[1] >= 0]) == nworkers * nops
    _replay(plain, entries)

    def tree(top: Path) -> dict[str, bytes]:
        return {f"{d}/{n}": (top / d / n).read_bytes() for d in DIRS for n in sorted(os.listdir(top / d))}

    expected = tree(plain)
    assert tree(m.path) == expected
    eacces = sum(1 for e in entries if tuple(e[3]) == ("err", errno.EACCES))
    print(f"{len(entries)} operations, {eacces} refused with EACCES while proj was disabled; "
          f"controller: {counts}")
    assert not daemon_errors(m, allowed=("is Disabled", "rewrap of", "refuses to", "Rewrap", "no longer exists")), \
        "\n".join(daemon_errors(m))[-4000:]
    m.unmount()
    m = store.mount()
    assert tree(m.path) == expected  # all of it was really stored
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report


RACING_CREATOR = textwrap.dedent("""
    import errno, json, os, sys, time
    top, me, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        name = f"c{me}-{i}"
        i += 1
        try:
            fd = os.open(os.path.join(top, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            print(json.dumps([name, exc.errno]), flush=True)
            continue
        try:
            os.write(fd, name.encode() * 100)
            result = 0
        except OSError as exc:
            result = -exc.errno  # created, then the write was refused
        finally:
            os.close(fd)
        print(json.dumps([name, result]), flush=True)
""")


def test_creates_racing_a_disable_leave_no_file_when_refused(store):
    """A create refused with EACCES because its key was disabled a moment before
    must leave no file behind (it once did, when the disable landed between the
    wrap of the new DEK and the open of the new file)."""
    m = store.mount()
    create_key(m, "proj")
    d = key_dir(m, "p", "proj")
    seconds = 1.5 * SCALE
    creators = [spawn(RACING_CREATOR, d, i, seconds) for i in range(4)]
    reports = [Reports(p) for p in creators]
    toggles = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for state in ("Disabled", "Enabled"):
                write_ctl(kpath(m, "proj", "state"), state)
                time.sleep(random.random() * 0.01)
            toggles += 1
    finally:
        write_ctl(kpath(m, "proj", "state"), "Enabled")
        errs = [wait_stop(p, 60) for p in creators]
        lines = [line for r in reports for line in r.finish()]
    assert all(p.returncode == 0 for p in creators), errs
    results = dict(json.loads(line) for line in lines)
    assert set(results.values()) <= {0, errno.EACCES, -errno.EACCES}, set(results.values())
    made = {name for name, code in results.items() if code <= 0}  # the create returned a file
    refused = {name for name, code in results.items() if code == errno.EACCES}
    assert refused, f"no create was refused in {toggles} disables"
    time.sleep(1.1)  # past the entry timeout: a negative dentry would hide a leftover file
    on_disk = set(os.listdir(d))
    assert on_disk == made, f"refused creates left files: {sorted(on_disk - made)[:10]}; lost: {sorted(made - on_disk)[:10]}"
    for name, code in results.items():
        if code == 0:
            assert (d / name).read_bytes() == name.encode() * 100
    assert not daemon_errors(m, allowed=("is Disabled", "refuses to")), "\n".join(daemon_errors(m))[-3000:]
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report
