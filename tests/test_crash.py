"""Crash recovery after SIGKILL of the daemon, and concurrent access.

Crash: writer processes keep the mount busy (one fsyncs every file it
finishes and reports its name and SHA-256 on a pipe, another writes, appends
and truncates without ever syncing, a third only reads) when the daemon is
killed with SIGKILL.  The writers are deterministic and report every
operation that has returned, so the test knows what each file must hold.
After a remount:

* every file reported as fsynced is intact;
* every acknowledged write survived, in every file;
* only the operation in flight at the kill may be partial: its file holds,
  block by block, the old or the new data, with a size in between.  No
  block is torn: every file reads completely with no EIO, and every size
  equals the length of what can be read.  (Format 2 makes each ciphertext
  block one page, and the kernel stops a write only between pages; with
  format 1's 4124-byte blocks this check failed about once in 10-20 kills);
* files of earlier rounds never change in later crashes.

Concurrency: several processes write different files and disjoint
block-aligned regions of one shared file, and append records to one log,
all at once through one daemon.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import mmap
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from crashkit import PAGE, check_partial, failed_only_by_the_kill, spawn, wait_stop
from kmsfs.format import DEFAULT_BLOCK_SIZE, ciphertext_size, plaintext_size

B = DEFAULT_BLOCK_SIZE


# The fsync writer's files come from a generator that the test replays.  The
# other writer reports each operation before it starts ("op ...") and after it
# returned ("ok N"), so the test knows exactly which ones were acknowledged
# and which one was in flight; its data comes from op_data().
def sync_files(seed):
    rng = random.Random(seed)
    i = 0
    while True:
        size = rng.choice([0, 1, 4095, 4096, 4097, 8192, rng.randrange(0, 300_000), rng.randrange(0, 700_000)])
        data = rng.randbytes(size)
        chunks = []
        while sum(chunks) < size:
            chunks.append(rng.choice([1, 100, 4096, 4097, 65536, 300_000]))
        yield f"sync-{i:04d}", data, chunks, i % 2 == 1
        i += 1


def op_data(seed, n, length):
    return random.Random(seed * 1_000_003 + n).randbytes(length)


#: The same functions for the child processes.
GENERATORS = "import random\n\n" + inspect.getsource(sync_files) + "\n" + inspect.getsource(op_data)

# How the children end once the daemon is gone: the failing errno on stderr.
CHILD_MAIN = textwrap.dedent("""
    import sys

    def run(main):
        try:
            main()
        except OSError as exc:
            sys.stderr.write(f"ERRNO {exc.errno} {exc}\\n")
            sys.exit(2)
        except ShortWrite as exc:
            # The daemon died between two requests of one large write(2).
            sys.stderr.write(f"SHORT {exc}\\n")
            sys.exit(3)

    class ShortWrite(Exception):
        pass

    def full(written, wanted):
        if written != wanted:
            raise ShortWrite(f"{written} of {wanted}")
""")

SYNC_WRITER = GENERATORS + CHILD_MAIN + textwrap.dedent("""
    import hashlib, os, sys
    directory, seed = sys.argv[1], int(sys.argv[2])

    def main():
        for name, data, chunks, datasync in sync_files(seed):
            fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            pos = 0
            for n in chunks:
                piece = data[pos:pos + n]
                full(os.write(fd, piece), len(piece))
                pos += len(piece)
            (os.fdatasync if datasync else os.fsync)(fd)
            # fsync has returned: from here on the file must survive a crash.
            print(name, len(data), hashlib.sha256(data).hexdigest(), flush=True)
            os.close(fd)

    run(main)
""")

NOSYNC_WRITER = GENERATORS + CHILD_MAIN + textwrap.dedent("""
    import os, sys
    directory, seed = sys.argv[1], int(sys.argv[2])
    path = lambda k: os.path.join(directory, f"nosync-{k}")
    rng = random.Random(seed)
    fds = {}

    def size_of(k):
        try:
            return os.stat(path(k)).st_size
        except FileNotFoundError:
            return 0

    def main():
        n = 0
        while True:
            k = rng.randrange(4)
            reopen = rng.random() < 0.1
            size = size_of(k)
            r = rng.random()
            if r < 0.5:
                op, arg = "pwrite", rng.randrange(0, size + 3 * 4096 + 1)
                length = rng.choice([1, 4095, 4096, 5000, 70_000, 1_000_000])
            elif r < 0.75:
                op, arg, length = "append", -1, rng.choice([1, 300, 4096, 131_072, 600_000])
            elif r < 0.9:
                op, arg, length = "ftruncate", rng.randrange(0, size + 20_000) if size < 1_500_000 else rng.randrange(0, size), 0
            else:
                op, arg, length = "truncate", rng.randrange(0, size + 1), 0
            data = op_data(seed, n, length)
            print("op", n, k, op, arg, length, size, flush=True)
            if k in fds and reopen:
                os.close(fds.pop(k))
            if k not in fds:
                fds[k] = os.open(path(k), os.O_CREAT | os.O_RDWR, 0o644)
            fd = fds[k]
            if op == "pwrite":
                full(os.pwrite(fd, data, arg), len(data))
            elif op == "append":
                with open(path(k), "ab", buffering=0) as fh:
                    full(fh.write(data), len(data))
            elif op == "ftruncate":
                os.ftruncate(fd, arg)
            else:
                os.truncate(path(k), arg)
            print("ok", n, flush=True)  # acknowledged: this operation must survive
            n += 1

    run(main)
""")

READER = CHILD_MAIN + textwrap.dedent("""
    import os, sys
    directory = sys.argv[1]

    def main():
        while True:
            for name in os.listdir(directory):
                try:
                    with open(os.path.join(directory, name), "rb") as fh:
                        while fh.read(1 << 20):
                            pass
                except FileNotFoundError:
                    pass

    run(main)
""")

class Collector:
    """Reads a child's report lines in a thread and signals after ``want`` of them."""

    def __init__(self, proc: subprocess.Popen, want: int) -> None:
        self.lines: list[str] = []
        self.enough = threading.Event()
        self.want = want
        self.proc = proc
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode())
            if len(self.lines) >= self.want:
                self.enough.set()
        self.enough.set()

    def finish(self) -> list[str]:
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.lines


def observe(path: Path) -> tuple[int, list[bytes | None]]:
    """Size and blocks of a file in the mount; None for a block that gives EIO
    (and a final None for a torn fragment after the last block).

    A buffered read of the whole file comes first.  Only if it fails, the file
    is read again block by block with O_DIRECT, which makes each block one read
    request, so that one bad block cannot fail its neighbours through readahead.
    """
    size = path.stat().st_size
    buf = mmap.mmap(-1, B)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        try:
            data = path.read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{path.name}: {exc}"
            blocks: list[bytes | None] = []
            for i in range(-(-size // B)):
                try:
                    n = os.preadv(fd, [buf], i * B)
                except OSError as exc:
                    assert exc.errno == errno.EIO, f"{path.name} block {i}: {exc}"
                    blocks.append(None)
                    continue
                blocks.append(bytes(buf[:n]))
            assert None in blocks, f"{path.name}: EIO on a buffered read, but every block reads"
        else:
            assert len(data) == size, f"{path.name}: st_size {size}, readable {len(data)}"
            blocks = [data[i:i + B] for i in range(0, size, B)]
        assert all(len(b) == B for b in blocks[:-1] if b is not None), f"{path.name}: short block inside the file"
        try:
            # The kernel answers buffered reads at EOF itself; ask the daemon.
            assert os.preadv(fd, [buf], len(blocks) * B) == 0, f"{path.name}: data beyond st_size"
        except OSError as exc:
            # A torn fragment too short to be a block (<= 28 bytes) after the last
            # block.  Every read that reaches the end fails then, so the last block
            # may already be marked: that is still one torn place, not two.
            assert exc.errno == errno.EIO, f"{path.name} at EOF: {exc}"
            if not blocks or blocks[-1] is not None:
                blocks.append(None)
    finally:
        os.close(fd)
    return size, blocks


def model_nosync(seed: int, lines: list[str]) -> tuple[dict[int, bytearray], tuple | None, list[str]]:
    """Replay the reported operations: the files after the acknowledged ones,
    the one in flight (or None), and any size the writer saw that differs
    from the model (a stale stat)."""
    files: dict[int, bytearray] = {}
    stale = []
    pending = None
    for line in lines:
        fields = line.split()
        if fields[0] == "op":
            n, k, op, arg, length, seen = int(fields[1]), int(fields[2]), fields[3], *map(int, fields[4:])
            model = files.get(k, bytearray())
            if seen != len(model):
                stale.append(f"op {n}: stat of nosync-{k} gave {seen}, the file had {len(model)}")
            if op == "append":
                arg = len(model)
            pending = (n, k, op, arg, op_data(seed, n, length))
        else:
            n, k, op, arg, data = pending
            assert int(fields[1]) == n
            apply_op(files.setdefault(k, bytearray()), op, arg, data)
            pending = None
    return files, pending, stale


def apply_op(model: bytearray, op: str, arg: int, data: bytes) -> None:
    if op in ("pwrite", "append"):
        if arg > len(model):
            model.extend(bytes(arg - len(model)))
        model[arg:arg + len(data)] = data
    elif arg < len(model):
        del model[arg:]
    else:
        model.extend(bytes(arg - len(model)))


# Each round kills after a different amount of work: right away, after the
# first fsynced file, and after more and more of them (with some slack).
KILL_AFTER = [(0, 0.05), (1, 0.0), (2, 0.13), (4, 0.31), (6, 0.07), (3, 0.5)]


def test_sigkill_recovery(store):
    mnt = store.mount()
    mountpoint = mnt.path
    # What every file must look like from now on: (size, blocks).
    settled: dict[str, tuple[int, list[bytes | None]]] = {}
    synced = 0
    for round_no, (after_reports, slack) in enumerate(KILL_AFTER):
        directory = mountpoint / f"round-{round_no}"
        directory.mkdir()
        sync_seed, nosync_seed = round_no, 100 + round_no
        # This daemon served the last round's checks: only this round's lines count.
        log_start = len(mnt.log())
        sync_writer = spawn(SYNC_WRITER, directory, sync_seed)
        nosync_writer = spawn(NOSYNC_WRITER, directory, nosync_seed)
        reader = spawn(READER, directory, reports=False)
        sync_reports = Collector(sync_writer, after_reports)
        nosync_reports = Collector(nosync_writer, 1)
        errors = {}
        try:
            assert sync_reports.enough.wait(30), "the fsync writer reported nothing"
            time.sleep(slack)
            for proc in (sync_writer, nosync_writer, reader):
                assert proc.poll() is None, f"a child died before the kill:\n{wait_stop(proc)}"
            killed = mnt
            mnt.kill9()
        finally:
            for what, proc in (("sync", sync_writer), ("nosync", nosync_writer), ("reader", reader)):
                errors[what] = wait_stop(proc, 10)
            reported = sync_reports.finish()
            nosync_lines = nosync_reports.finish()
        for what, err in errors.items():
            # After the kill the children fail on the dead mount, and on nothing else.
            assert failed_only_by_the_kill(err), \
                f"{what} failed after the kill with:\n{err}\nreports: sync {len(reported)}, nosync {len(nosync_lines)}\n" \
                + "\n".join(line for line in killed.log()[log_start:].splitlines() if " DEBUG " not in line)[-3000:]

        # Until it was killed, the daemon answered no request of this round with an error it logs.
        round_log = killed.log()[log_start:]
        assert not [line for line in round_log.splitlines() if " ERROR " in line or "Traceback" in line], \
            "\n".join(line for line in round_log.splitlines() if " DEBUG " not in line)[-3000:]

        mnt = store.mount(mountpoint)
        # 1. Files of the round before are exactly as they were (all rounds: below).
        for name, expected in settled.items():
            if name.startswith(f"round-{round_no - 1}/"):
                assert observe(mountpoint / name) == expected, f"{name} changed after a later crash"
        # 2. fsynced files are intact; the one being written at the kill is a prefix.
        actual = {p.name: observe(p) for p in directory.iterdir()}
        generated = sync_files(sync_seed)
        for line in reported:
            name, data, _, _ = next(generated)
            assert line.split() == [name, str(len(data)), hashlib.sha256(data).hexdigest()]
            size, blocks = actual.pop(name)
            assert size == len(data) and b"".join(b or b"?" for b in blocks) == data, f"fsynced {name} differs"
        synced += len(reported)
        name, data, _, _ = next(generated)
        if name in actual:
            size, blocks = actual.pop(name)
            check_partial(name, size, blocks, [b"", data])
        # 3. Every acknowledged write survived; only the operation in flight may be partial.
        files, pending, stale = model_nosync(nosync_seed, nosync_lines)
        # Sizes from stat(2) were right all along (a size the writer saw after
        # its own acknowledged writes).
        assert not stale, stale
        k = -1
        if pending is not None:
            _, k, op, arg, data = pending
            before = bytes(files.get(k, b""))
            after = bytearray(before)
            apply_op(after, op, arg, data)
        for index in range(4):
            name = f"nosync-{index}"
            if name not in actual:
                assert index not in files, f"{name} is lost"
                continue
            size, blocks = actual.pop(name)
            if index == k:
                check_partial(name, size, blocks, [before, bytes(after)])
            else:
                assert index in files, f"{name} should not exist"
                assert size == len(files[index]), f"{name}: size {size}, acknowledged {len(files[index])}"
                assert b"".join(b or b"?" for b in blocks) == files[index], f"{name}: acknowledged data lost"
        assert not actual, f"unexpected files {sorted(actual)}"
        # 4. Sizes in the mount follow from valid backing sizes.
        for path in (store.backing / f"round-{round_no}").iterdir():
            assert plaintext_size(path.stat().st_size, B) == (directory / path.name).stat().st_size
        for path in directory.iterdir():
            settled[f"round-{round_no}/{path.name}"] = observe(path)
        # 5. The remounted store is fully usable.
        (directory / "after").write_bytes(b"after the crash" * 1000)
        assert (directory / "after").read_bytes() == b"after the crash" * 1000
        settled[f"round-{round_no}/after"] = observe(directory / "after")
    assert synced >= sum(n for n, _ in KILL_AFTER)
    for name, expected in settled.items():
        assert observe(mountpoint / name) == expected, f"{name} changed after a later crash"
    mnt.unmount()


# ============================================================================ concurrency

WORKER = textwrap.dedent("""
    import os, random, sys
    directory, index, nproc, region_blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    B = 4096
    rng = random.Random(index)

    def expected_own(i):
        return random.Random(1000 + i).randbytes(50_000 + 37_123 * i)

    def expected_region(i):
        return random.Random(2000 + i).randbytes(region_blocks * B)

    own = expected_own(index)
    region = expected_region(index)
    base = index * region_blocks * B
    own_path = os.path.join(directory, f"own-{index}")
    shared = os.open(os.path.join(directory, "shared"), os.O_RDWR)
    log = os.open(os.path.join(directory, "log"), os.O_WRONLY | os.O_APPEND)
    mine = os.open(own_path, os.O_CREAT | os.O_RDWR, 0o644)
    # Own file: chunks of random sizes, written in a random order.
    cuts = sorted({0, len(own), *rng.sample(range(1, len(own)), 20)})
    chunks = list(zip(cuts, cuts[1:]))
    rng.shuffle(chunks)
    # Shared file: block-aligned chunks of this worker's region, in a random order.
    blocks = list(range(0, region_blocks, 3))
    rng.shuffle(blocks)
    record = 0
    while chunks or blocks:
        if chunks:
            start, end = chunks.pop()
            assert os.pwrite(mine, own[start:end], start) == end - start
            assert os.pread(mine, end - start, start) == own[start:end]
        if blocks:
            b = blocks.pop()
            n = min(3, region_blocks - b)
            piece = region[b * B:(b + n) * B]
            assert os.pwrite(shared, piece, base + b * B) == len(piece)
            assert os.pread(shared, len(piece), base + b * B) == piece
        line = f"{index:02d}:{record:05d}:".encode()
        os.write(log, line + bytes([65 + index]) * (100 - len(line) - 1) + b"\\n")
        record += 1
        # Read what the others have finished so far (must never fail).
        for j in range(nproc):
            try:
                with open(os.path.join(directory, f"own-{j}"), "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                continue
            expected = expected_own(j)
            assert len(data) <= len(expected)
    os.fsync(mine)
    assert os.pread(mine, len(own) + 10, 0) == own
    assert os.pread(shared, len(region), base) == region
    print(record, flush=True)
""")


@pytest.mark.parametrize("nproc", [4, 8])
def test_concurrent_processes(store, nproc):
    mnt = store.mount()
    directory = mnt.path / "conc"
    directory.mkdir()
    region_blocks = 40
    (directory / "shared").touch()
    (directory / "log").touch()
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(directory), str(i), str(nproc), str(region_blocks)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(nproc)
    ]
    records = {}
    try:
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"worker {i} failed:\n{err.decode()}"
            records[i] = int(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def check(top: Path) -> None:
        for i in range(nproc):
            assert (top / f"own-{i}").read_bytes() == random.Random(1000 + i).randbytes(50_000 + 37_123 * i)
        shared = (top / "shared").read_bytes()
        # The workers' regions are in 4 KiB pages (which straddle kmsfs blocks).
        assert len(shared) == nproc * region_blocks * PAGE
        for i in range(nproc):
            region = shared[i * region_blocks * PAGE:(i + 1) * region_blocks * PAGE]
            assert region == random.Random(2000 + i).randbytes(region_blocks * PAGE), f"region {i}"
        lines = (top / "log").read_bytes().splitlines(keepends=True)
        assert len(lines) == sum(records.values())
        seen: dict[int, list[int]] = {i: [] for i in range(nproc)}
        for line in lines:
            assert len(line) == 100, line
            index, record, _ = line.split(b":", 2)
            fill = line[len(b"00:00000:"):-1]
            assert fill == bytes([65 + int(index)]) * len(fill), line
            seen[int(index)].append(int(record))
        for i in range(nproc):
            # Each process's appends land whole and in its own order.
            assert seen[i] == list(range(records[i])), f"worker {i}"

    check(directory)
    assert (store.backing / "conc" / "shared").stat().st_size == ciphertext_size(nproc * region_blocks * PAGE, B)
    assert not [line for line in mnt.log().splitlines() if " ERROR " in line], mnt.log()[-3000:]
    mnt.unmount()
    m2 = store.mount()
    check(m2.path / "conc")


def test_concurrent_readers_and_writer_on_one_file(store):
    """Readers of one file while a writer rewrites runs of whole 4 KiB pages
    (each page overlaps two kmsfs blocks, so every write is a read-modify-write).

    With O_DIRECT every read and write request reaches the daemon, which must
    serve each one atomically: every block read is one of the versions
    written, never a mix.  Buffered readers may see a page torn between two
    versions (the kernel copies page-cache pages without a lock; a plain ext4
    file does the same), but never anything that was not written, never a
    wrong size and never an error.
    """
    mnt = store.mount()
    path = mnt.path / "hot"
    nblocks = 64
    versions = [bytes([v]) * PAGE for v in range(1, 6)]
    path.write_bytes(versions[0] * nblocks)
    reader = textwrap.dedent("""
        import mmap, os, sys, time
        path, nblocks, direct = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
        valid = {bytes([v]) * 4096 for v in range(1, 6)}
        buf = mmap.mmap(-1, nblocks * 4096)  # page-aligned, as O_DIRECT needs
        deadline = time.monotonic() + 2.0
        reads = 0
        while time.monotonic() < deadline:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                n = os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)
            assert n == nblocks * 4096, n
            data = bytes(buf)
            if direct:
                for i in range(nblocks):
                    block = data[i * 4096:(i + 1) * 4096]
                    assert block in valid, (i, set(block))
            else:
                assert set(data) <= {1, 2, 3, 4, 5}, set(data)
            reads += 1
        print(reads)
    """)
    readers = [subprocess.Popen([sys.executable, "-c", reader, str(path), str(nblocks), str(i % 2)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    rng = random.Random(5)
    buf = mmap.mmap(-1, nblocks * PAGE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                first = rng.randrange(nblocks)
                count = rng.randint(1, nblocks - first)
                buf[:count * PAGE] = rng.choice(versions) * count
                assert os.pwritev(fd, [memoryview(buf)[:count * PAGE]], first * PAGE) == count * PAGE
        finally:
            os.close(fd)
        for proc in readers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
            assert int(out) > 0
    finally:
        for proc in readers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    data = path.read_bytes()
    assert len(data) == nblocks * PAGE
    assert all(data[i * PAGE:(i + 1) * PAGE] in versions for i in range(nblocks))
    assert not [line for line in mnt.log().splitlines() if " ERROR " in line], mnt.log()[-3000:]
