"""A model check: kmsfs must behave exactly like a plain directory.

A hypothesis state machine applies one random sequence of file operations to
a tree on a real kmsfs mount and to a plain temporary directory (on the same
backing filesystem), and after every step requires the same names, types,
sizes, link counts and contents in both.  Every operation must also end the
same way in both trees: the same result, or the same errno.  Now and then it
unmounts and mounts the store again (a new daemon), which proves that
everything seen so far was really stored.

One store and one mount serve the whole run; each example works in its own
subdirectory.  The store, the mount and the daemon are cleaned up in a
``finally`` whatever happens.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import Mount, Store, make_store
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from kmsfs.format import DEFAULT_BLOCK_SIZE
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

B = DEFAULT_BLOCK_SIZE  # block boundaries are where the edge cases are

FILE_NAMES = ["a", "b", "c", "d", "e"]
DIR_NAMES = ["x", "y"]

sizes = st.one_of(
    st.sampled_from([0, 1, B - 1, B, B + 1, 2 * B, 3 * B - 1, 16 * B + 1]),
    st.integers(0, 64 * 1024),
)
seeds = st.integers(0, 2**32 - 1)


def payload(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    kind = seed % 4
    if kind == 0:
        return bytes(size)  # zeros: must not be confused with holes
    if kind == 1:
        return bytes([seed % 251 + 1]) * size
    return rng.randbytes(size)


class Holder:
    """The store and its current mount, shared by all examples of one run."""

    def __init__(self, store: Store, mount: Mount, ref_base: Path) -> None:
        self.store = store
        self.mount = mount
        self.mountpoint = mount.path
        self.ref_base = ref_base
        self.cases = 0
        self.remounts = 0

    def remount(self) -> None:
        self.mount.unmount()
        self.mount = self.store.mount(self.mountpoint)
        self.remounts += 1


def outcome(fn: Callable[[Path], Any], root: Path) -> tuple[str, Any]:
    try:
        return ("ok", fn(root))
    except OSError as exc:
        return ("error", exc.errno)


class KmsfsVersusPlainDirectory(RuleBasedStateMachine):
    holder: Holder | None = None

    def __init__(self) -> None:
        super().__init__()
        holder = type(self).holder
        assert holder is not None
        self.h = holder
        holder.cases += 1
        self.case = f"case-{holder.cases:04d}"
        self.remounted = False
        self.ref = holder.ref_base / self.case
        self.ref.mkdir()
        (holder.mountpoint / self.case).mkdir()

    @property
    def mnt(self) -> Path:
        return self.h.mountpoint / self.case

    # ------------------------------------------------------------ helpers

    def both(self, fn: Callable[[Path], Any]) -> Any:
        expected = outcome(fn, self.ref)
        actual = outcome(fn, self.mnt)
        assert actual == expected, f"kmsfs gave {actual}, a plain directory {expected}"
        return expected

    def dirs(self) -> list[str]:
        found = [""]
        for top, dirnames, _ in os.walk(self.ref):
            rel = os.path.relpath(top, self.ref)
            found += [os.path.normpath(os.path.join(rel, d)) for d in dirnames]
        return sorted(found)

    def files(self) -> list[str]:
        found = []
        for top, _, filenames in os.walk(self.ref):
            rel = os.path.relpath(top, self.ref)
            found += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
        return sorted(found)

    def entries(self) -> list[str]:
        return sorted(set(self.files()) | set(self.dirs()) - {""})

    def pick_file(self, data: st.DataObject) -> str | None:
        files = self.files()
        return data.draw(st.sampled_from(files), label="file") if files else None

    def pick_dir(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(self.dirs()), label="dir")

    # ------------------------------------------------------------ rules

    def has_files(self) -> bool:
        return bool(self.files())

    @initialize(size=sizes, seed=seeds)
    def start_tree(self, size, seed) -> None:
        for name in DIR_NAMES:
            self.both(lambda root, n=name: (root / n).mkdir())
        content = payload(size, seed)
        self.both(lambda root: (root / "a").write_bytes(content))
        self.both(lambda root: (root / "x" / "b").write_bytes(content[::-1]))

    @rule(data=st.data(), name=st.sampled_from(FILE_NAMES), size=sizes, seed=seeds)
    def create_file(self, data, name, size, seed):
        target = os.path.join(self.pick_dir(data), name)
        content = payload(size, seed)
        self.both(lambda root: (root / target).write_bytes(content))

    @precondition(has_files)
    @rule(data=st.data(), seed=seeds, size=sizes, past_eof=st.integers(0, 3 * B))
    def write_at(self, data, seed, size, past_eof):
        path = self.pick_file(data)
        if path is None:
            return
        length = (self.ref / path).stat().st_size
        offset = data.draw(st.one_of(st.integers(0, length), st.just(length + past_eof)), label="offset")
        content = payload(size % (16 * B + 2), seed)

        def write(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                return os.pwrite(fd, content, offset)
            finally:
                os.close(fd)

        self.both(write)

    @precondition(has_files)
    @rule(data=st.data(), seed=seeds, size=st.integers(1, 3 * B + 3))
    def append(self, data, seed, size):
        path = self.pick_file(data)
        if path is None:
            return
        content = payload(size, seed)

        def append(root: Path) -> int:
            with open(root / path, "ab") as fh:
                return fh.write(content)

        self.both(append)

    @precondition(has_files)
    @rule(data=st.data(), size=sizes, via_fd=st.booleans())
    def truncate(self, data, size, via_fd):
        path = self.pick_file(data)
        if path is None:
            return

        def truncate(root: Path) -> None:
            if via_fd:
                with open(root / path, "r+b") as fh:
                    fh.truncate(size)
            else:
                os.truncate(root / path, size)

        self.both(truncate)

    @precondition(has_files)
    @rule(data=st.data(), offset=st.integers(0, 80 * 1024), length=st.integers(0, 80 * 1024))
    def read_at(self, data, offset, length):
        path = self.pick_file(data)
        if path is None:
            return

        def read(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        self.both(read)

    @rule(data=st.data(), name=st.sampled_from(FILE_NAMES + DIR_NAMES))
    def rename(self, data, name):
        entries = self.entries()
        if not entries:
            return
        src = data.draw(st.sampled_from(entries), label="src")
        dst = os.path.join(self.pick_dir(data), name)
        self.both(lambda root: os.rename(root / src, root / dst))

    @precondition(has_files)
    @rule(data=st.data())
    def unlink(self, data):
        path = self.pick_file(data)
        if path is None:
            return
        self.both(lambda root: os.unlink(root / path))

    @rule(data=st.data(), name=st.sampled_from(DIR_NAMES + FILE_NAMES[:1]))
    def mkdir(self, data, name):
        target = os.path.join(self.pick_dir(data), name)
        self.both(lambda root: os.mkdir(root / target))

    @precondition(lambda self: len(self.dirs()) > 1)
    @rule(data=st.data())
    def rmdir(self, data):
        target = self.pick_dir(data)
        if target == "":
            return
        self.both(lambda root: os.rmdir(root / target))

    @precondition(has_files)
    @rule(data=st.data(), name=st.sampled_from(FILE_NAMES))
    def link(self, data, name):
        path = self.pick_file(data)
        if path is None:
            return
        dst = os.path.join(self.pick_dir(data), name)
        self.both(lambda root: os.link(root / path, root / dst))

    @precondition(lambda self: not self.remounted)
    @rule(chance=st.integers(0, 6))
    def remount(self, chance):
        # At most once per example, and not on hypothesis's favourite value 0:
        # a remount costs a third of a second.
        if chance in (2, 3, 5):
            self.h.remount()
            self.remounted = True

    # ------------------------------------------------------------ the check

    @invariant()
    def same_tree(self) -> None:
        for top, dirnames, filenames in os.walk(self.ref):
            rel = os.path.relpath(top, self.ref)
            mtop = self.mnt / rel
            assert sorted(os.listdir(mtop)) == sorted(dirnames + filenames), rel
            for d in dirnames:
                assert stat.S_ISDIR(os.lstat(mtop / d).st_mode), os.path.join(rel, d)
            for f in filenames:
                ref_st = os.lstat(Path(top) / f)
                mnt_st = os.lstat(mtop / f)
                where = os.path.join(rel, f)
                assert stat.S_ISREG(mnt_st.st_mode), where
                assert mnt_st.st_size == ref_st.st_size, where
                assert mnt_st.st_nlink == ref_st.st_nlink, where
                expected = (Path(top) / f).read_bytes()
                actual = (mtop / f).read_bytes()
                assert len(actual) == len(expected), where
                assert actual == expected, f"{where}: contents differ"

    def teardown(self) -> None:
        shutil.rmtree(self.ref, ignore_errors=True)
        try:
            shutil.rmtree(self.mnt)
        except OSError:
            pass  # the mount may be what failed; the run's cleanup handles it


def test_kmsfs_behaves_like_a_plain_directory(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    ref_base = tmp_path / "ref"
    ref_base.mkdir()
    try:
        holder = Holder(store, store.mount(), ref_base)
        KmsfsVersusPlainDirectory.holder = holder
        run_state_machine_as_test(
            KmsfsVersusPlainDirectory,
            settings=settings(
                max_examples=25, stateful_step_count=30, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much],
            ),
        )
        # The runs did remount (a new daemon) now and then.
        assert holder.remounts >= 1
        # The run ends with a clean unmount and one last remount check.
        holder.remount()
        # Every example removed its tree; only the virtual control directory may remain.
        assert [n for n in os.listdir(holder.mountpoint) if n != ".kmsfs"] == []
        assert sorted(os.listdir(store.backing)) == [".kmsfs.d"]
        # No request was answered with an error that the daemon logs (EIO and the like).
        errors = [line for m in store.mounts for line in m.log().splitlines() if " ERROR " in line]
        assert not errors, "\n".join(errors[:20])
    finally:
        KmsfsVersusPlainDirectory.holder = None
        for m in store.mounts:
            m.cleanup()
