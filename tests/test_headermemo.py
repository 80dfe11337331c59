"""The header memo (kmsfs/headermemo.py), the ctime check it depends on, and its use by a mount.

The memo saves the header's disk read at open only while the backing file's
stamp (mtime, ctime, size) is what it was when the header was read; these
tests show that every change to a header behind the mount's back, and every
change through it, is still seen at the next open.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from kmsfs import mount as kmsfs_mount
from kmsfs import store as kmsfs_store
from kmsfs.fs import ENTRY_TIMEOUT
from kmsfs.headermemo import HeaderMemo
from kmsfs.store import ctime_moves_after_stat

from conftest import Mount, Store

HEADER = "user.kmsfs"
KEY_XATTR = "user.kmsfs.key"


# ---------------------------------------------------------------------- the memo alone

def test_a_header_is_given_back_only_at_the_stamp_it_was_read_at():
    memo = HeaderMemo(4)
    assert memo.get((1, 10), (5, 6, 7)) is None
    memo.put((1, 10), (5, 6, 7), b"header")
    assert memo.get((1, 10), (5, 6, 7)) == b"header"
    for moved in ((5, 6, 8), (5, 9, 7), (4, 6, 7)):  # size, ctime or mtime moved
        assert memo.get((1, 10), moved) is None
    assert memo.get((2, 10), (5, 6, 7)) is None  # same inode number, other device
    assert memo.stats() == {"entries": 1, "hits": 1, "misses": 5}


def test_holds_answers_without_counting():
    memo = HeaderMemo(4)
    memo.put("k", (1, 2, 3), b"h")
    assert memo.holds("k", (1, 2, 3)) and not memo.holds("k", (1, 2, 4)) and not memo.holds("x", (1, 2, 3))
    assert memo.stats() == {"entries": 1, "hits": 0, "misses": 0}


def test_a_new_put_replaces_the_old_stamp_and_header():
    memo = HeaderMemo(4)
    memo.put("k", (1, 1, 1), b"old")
    memo.put("k", (2, 2, 2), b"new")
    assert memo.get("k", (1, 1, 1)) is None
    assert memo.get("k", (2, 2, 2)) == b"new"
    assert len(memo) == 1


def test_the_least_recently_used_entries_go_first_beyond_capacity():
    memo = HeaderMemo(3)
    for key in "abc":
        memo.put(key, (0, 0, 0), key.encode())
    assert memo.get("a", (0, 0, 0)) == b"a"  # a is now the most recent
    memo.put("d", (0, 0, 0), b"d")
    assert len(memo) == 3
    assert memo.get("b", (0, 0, 0)) is None
    assert [memo.get(k, (0, 0, 0)) for k in "acd"] == [b"a", b"c", b"d"]


def test_a_memo_needs_room_for_one_header():
    with pytest.raises(ValueError):
        HeaderMemo(0)


# ---------------------------------------------------------------------- the ctime check

def _probe_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".kmsfs-ctime-probe.")]


def _changes_after_stat_move_ctime(directory: Path) -> bool:
    """The property ctime_moves_after_stat checks, found out here on its own, without a time limit:
    200 changes, each right after a stat, and whether any kept the ctime."""
    path = directory / "independent-ctime-check"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        seen = [os.fstat(fd).st_ctime_ns]
        for turn in range(200):
            os.setxattr(fd, "user.check", str(turn).encode())
            seen.append(os.fstat(fd).st_ctime_ns)
        return all(before < after for before, after in zip(seen, seen[1:]))
    finally:
        os.close(fd)
        os.unlink(path)


def test_the_ctime_check_says_what_the_filesystem_does_and_leaves_nothing_behind(tmp_path: Path):
    assert ctime_moves_after_stat(tmp_path) is _changes_after_stat_move_ctime(tmp_path)
    assert _probe_files(tmp_path) == []


def test_the_ctime_check_fails_where_changes_keep_the_ctime(tmp_path: Path, monkeypatch):
    real_fstat = os.fstat

    class Coarse:
        def __init__(self, st: os.stat_result) -> None:
            self._st = st

        def __getattr__(self, name: str):
            return getattr(self._st, name)

        st_ctime_ns = 1_000_000_000  # one clock tick for every change

    monkeypatch.setattr(kmsfs_store.os, "fstat", lambda fd: Coarse(real_fstat(fd)))
    assert ctime_moves_after_stat(tmp_path) is False
    assert _probe_files(tmp_path) == []


def test_the_ctime_check_fails_when_the_changes_take_too_long_to_tell(tmp_path: Path, monkeypatch):
    calls = []

    def slow_clock() -> float:  # each run takes 1 s: every change could have its own tick
        calls.append(1)
        return float(len(calls))

    monkeypatch.setattr(kmsfs_store.time, "monotonic", slow_clock)
    assert ctime_moves_after_stat(tmp_path) is False
    assert len(calls) == 2 * kmsfs_store.CTIME_PROBE_ATTEMPTS  # tried again each time, then gave up
    assert _probe_files(tmp_path) == []


def test_the_ctime_check_tries_again_after_a_slow_run(tmp_path: Path, monkeypatch):
    if not _changes_after_stat_move_ctime(tmp_path):
        pytest.skip("this filesystem gives changes right after a stat the same ctime")
    readings = iter([0.0, 5.0, 10.0, 10.0])  # the first run preempted for 5 s, the second quick
    monkeypatch.setattr(kmsfs_store.time, "monotonic", lambda: next(readings))
    assert ctime_moves_after_stat(tmp_path) is True
    assert _probe_files(tmp_path) == []


def test_the_ctime_check_fails_without_xattrs_or_a_writable_directory(tmp_path: Path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOTSUP, "no xattrs here")

    with monkeypatch.context() as patch:
        patch.setattr(kmsfs_store.os, "setxattr", refuse)
        assert ctime_moves_after_stat(tmp_path) is False
    assert _probe_files(tmp_path) == []
    assert ctime_moves_after_stat(tmp_path / "missing") is False


def test_the_mount_keeps_no_memo_where_the_ctime_check_fails(tmp_path: Path, monkeypatch, caplog):
    (tmp_path / kmsfs_store.STORE_DIR_NAME).mkdir()
    monkeypatch.setattr(kmsfs_mount, "ctime_moves_after_stat", lambda directory: False)
    with caplog.at_level("INFO", logger="kmsfs.mount"):
        assert kmsfs_mount._header_memo(tmp_path) == (None, -1)
    assert "header memo off" in caplog.text
    monkeypatch.setattr(kmsfs_mount, "ctime_moves_after_stat", lambda directory: True)
    memo, device = kmsfs_mount._header_memo(tmp_path)
    assert isinstance(memo, HeaderMemo) and memo.capacity == kmsfs_mount.HEADER_MEMO
    assert device == os.stat(tmp_path / kmsfs_store.STORE_DIR_NAME).st_dev


# ---------------------------------------------------------------------- through a mount

def memo_stats(m: Mount) -> dict[str, int]:
    stats = json.loads((m.path / ".kmsfs" / "status").read_bytes())["header_memo"]
    if stats is None:
        # Off only where the filesystem really keeps ctimes: a broken check must not skip these tests.
        assert not _changes_after_stat_move_ctime(m.store.backing), "header memo off on fine-grained ctimes"
        pytest.skip("the backing filesystem gives changes right after a stat the same ctime: no header memo")
    return stats


def test_reopening_an_unchanged_file_uses_the_remembered_header(store: Store):
    m = store.mount()
    (m.path / "f").write_bytes(b"one" * 5000)  # remembered as it is closed
    before = memo_stats(m)
    assert before["entries"] >= 1
    for _ in range(3):
        assert (m.path / "f").read_bytes() == b"one" * 5000
    after = memo_stats(m)
    assert after["hits"] - before["hits"] == 3
    assert after["misses"] == before["misses"]
    m.unmount()


def test_a_header_swapped_behind_the_mounts_back_is_seen_at_the_next_open(store: Store):
    m = store.mount()
    (m.path / "a").write_bytes(b"a" * 9000)
    (m.path / "b").write_bytes(b"b" * 9000)
    assert (m.path / "a").read_bytes() == b"a" * 9000
    hits = memo_stats(m)["hits"]
    # b's header on a's content: the header names another file and DEK.
    os.setxattr(store.backing / "a", HEADER, os.getxattr(store.backing / "b", HEADER))
    with pytest.raises(OSError) as caught:
        (m.path / "a").read_bytes()
    assert caught.value.errno == errno.EIO
    assert memo_stats(m)["hits"] == hits  # the memo missed: the ctime moved
    assert (m.path / "b").read_bytes() == b"b" * 9000
    m.unmount()


def test_a_header_put_back_behind_the_mounts_back_is_read_again(store: Store):
    m = store.mount()
    (m.path / "a").write_bytes(b"a" * 9000)
    good = os.getxattr(store.backing / "a", HEADER)
    os.setxattr(store.backing / "a", HEADER, good[:-1] + bytes([good[-1] ^ 1]))  # a flipped tag bit
    with pytest.raises(OSError) as caught:
        (m.path / "a").read_bytes()
    assert caught.value.errno == errno.EIO
    os.setxattr(store.backing / "a", HEADER, good)  # and the good one back: readable again
    assert (m.path / "a").read_bytes() == b"a" * 9000
    m.unmount()


def _disable(m: Mount, alias: str) -> None:
    fd = os.open(m.path / ".kmsfs" / "keys" / alias / "state", os.O_WRONLY)
    try:
        os.write(fd, b"Disabled")
    finally:
        os.close(fd)


def test_a_rewrap_is_seen_by_the_next_open_and_the_old_key_no_longer_counts(store: Store):
    m = store.mount()
    for alias in ("first", "other"):
        os.mkdir(m.path / ".kmsfs" / "keys" / alias)
    (m.path / "f").write_bytes(b"f" * 9000)
    os.setxattr(m.path / "f", KEY_XATTR, b"first")
    hits = memo_stats(m)["hits"]
    assert (m.path / "f").read_bytes() == b"f" * 9000
    assert (m.path / "f").read_bytes() == b"f" * 9000  # remembered under "first"
    assert memo_stats(m)["hits"] == hits + 1
    os.setxattr(m.path / "f", KEY_XATTR, b"other")
    _disable(m, "first")
    assert (m.path / "f").read_bytes() == b"f" * 9000  # the header of the rewrap, under "other"
    _disable(m, "other")
    with pytest.raises(OSError) as caught:
        (m.path / "f").read_bytes()
    assert caught.value.errno == errno.EACCES
    m.unmount()


def test_a_file_changed_through_the_mount_is_remembered_as_it_is_now(store: Store):
    m = store.mount()
    path = m.path / "f"
    path.write_bytes(b"x" * 100)
    with open(path, "r+b") as fh:  # a change while open: the stamp moves, and is re-read at close
        fh.seek(50_000)
        fh.write(b"y")
    os.chmod(path, 0o600)  # and one on the closed file: the next open reads the header again
    misses = memo_stats(m)["misses"]
    assert path.read_bytes() == b"x" * 100 + bytes(50_000 - 100) + b"y"
    assert memo_stats(m)["misses"] == misses + 1
    hits = memo_stats(m)["hits"]
    assert path.read_bytes()[-1:] == b"y"
    assert memo_stats(m)["hits"] == hits + 1
    m.unmount()


def test_a_file_replaced_behind_the_mounts_back_is_read_as_the_new_file(store: Store):
    m = store.mount()
    (m.path / "old").write_bytes(b"o" * 9000)
    (m.path / "new").write_bytes(b"n" * 7000)
    assert (m.path / "old").read_bytes() == b"o" * 9000
    # Another inode, with its own header, under the old name: both headers are remembered.
    os.replace(store.backing / "new", store.backing / "old")
    time.sleep(ENTRY_TIMEOUT + 0.2)  # until the kernel looks the name up again
    assert (m.path / "old").read_bytes() == b"n" * 7000
    m.unmount()
