"""A truncate into the middle of a block survives a crash between its two steps.

The truncate cuts the backing file at the block's start, then writes the kept
bytes back as a shorter block.  The tests kill a process exactly between the
two steps (os.pwrite replaced by a SIGKILL of itself), then check that the
intent record brings the file to its truncated content, with nothing lost:

* in-process, on a CipherFile over a plain file with a header xattr;
* on a real store: a child process truncates a store file through the real
  envelope (HSM unwrap) and is killed; fsck stays clean and names the pending
  truncate, and the next mount completes it before serving.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, Store
from kmsfs.cipherfile import CipherFile
from kmsfs.contentcrypt import ContentCipher
from kmsfs.format import DEFAULT_BLOCK_SIZE, Header, ciphertext_size
from kmsfs.store import store_dir
from kmsfs.truncation import INTENT_DIR, TruncateIntent, TruncationJournal

B = DEFAULT_BLOCK_SIZE

KILL_INSIDE_TRUNCATE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from kmsfs.cipherfile import CipherFile
    from kmsfs.truncation import TruncationJournal

    def die(*args):  # the moment between the cut and the write of the kept block
        os.kill(os.getpid(), signal.SIGKILL)

    def truncate(fd, cipher, backing, size):
        cf = CipherFile(fd, cipher, TruncationJournal(Path(backing)))
        os.pwrite = die
        cf.truncate(size)
""")


def plain_store(tmp_path: Path) -> Path:
    backing = tmp_path / "b"
    store_dir(backing).mkdir(parents=True)
    return backing


def new_file(backing: Path, name: str, data: bytes) -> tuple[Path, bytes, bytes]:
    """A file with a (fake-wrapped) header and real content blocks; returns (path, dek, file_id)."""
    dek, file_id = os.urandom(32), os.urandom(16)
    path = backing / name
    path.parent.mkdir(parents=True, exist_ok=True)
    header = Header(B, file_id, os.urandom(16), 1, b"", os.urandom(12), os.urandom(48))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.setxattr(fd, "user.kmsfs", header.to_bytes())
        CipherFile(fd, ContentCipher(dek, file_id, B)).write(0, data)
    finally:
        os.close(fd)
    return path, dek, file_id


def read_all(path: Path, dek: bytes, file_id: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        cf = CipherFile(fd, ContentCipher(dek, file_id, B))
        return cf.read(0, cf.size())
    finally:
        os.close(fd)


def kill_inside_truncate(backing: Path, path: Path, dek: bytes, file_id: bytes, size: int) -> None:
    script = KILL_INSIDE_TRUNCATE + textwrap.dedent(f"""
        from kmsfs.contentcrypt import ContentCipher
        fd = os.open({str(path)!r}, os.O_RDWR)
        truncate(fd, ContentCipher(bytes.fromhex({dek.hex()!r}), bytes.fromhex({file_id.hex()!r}), {B}),
                 {str(backing)!r}, {size})
        print("not killed")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("size", [1, B - 1, B + 1, 3 * B + 100, 5 * B - 7])
def test_a_truncate_killed_between_cut_and_write_is_completed(tmp_path: Path, size: int):
    backing = plain_store(tmp_path)
    data = os.urandom(5 * B + 300)
    path, dek, file_id = new_file(backing, "d/f", data)
    kill_inside_truncate(backing, path, dek, file_id, size)
    # Cut, not yet written: the kept bytes of the last block are only in the record.
    assert path.stat().st_size == size // B * ciphertext_size(B, B)
    journal = TruncationJournal(backing)
    assert len(journal.pending()) == 1
    done = journal.complete_pending()
    assert done == ["d/f: truncate completed"]
    assert read_all(path, dek, file_id) == data[:size]
    assert path.stat().st_size == ciphertext_size(size, B)
    assert journal.pending() == [] and os.listdir(backing / ".kmsfs.d" / INTENT_DIR) == []
    assert journal.complete_pending() == []  # idempotent: nothing left


def test_completion_finds_a_renamed_file_and_is_idempotent(tmp_path: Path):
    backing = plain_store(tmp_path)
    data = os.urandom(3 * B)
    path, dek, file_id = new_file(backing, "a", data)
    kill_inside_truncate(backing, path, dek, file_id, B + 10)
    path.rename(backing / "moved")
    record_path = TruncationJournal(backing).pending()[0]
    record = TruncateIntent.from_json(record_path.read_bytes())
    # The block write may have happened already before the crash: applying it again changes nothing.
    fd = os.open(backing / "moved", os.O_RDWR)
    os.pwrite(fd, record.block, record.offset)
    os.close(fd)
    assert TruncationJournal(backing).complete_pending() == ["moved: truncate completed"]
    assert read_all(backing / "moved", dek, file_id) == data[:B + 10]


def test_a_live_truncate_is_never_completed_by_someone_else(tmp_path: Path):
    backing = plain_store(tmp_path)
    path, dek, file_id = new_file(backing, "f", os.urandom(2 * B))
    journal = TruncationJournal(backing)
    fd = os.open(path, os.O_RDWR)
    try:
        with journal.intent(fd, file_id, 0, b"x" * 40):
            # Another mount's recovery sees the record, but its owner holds the lock.
            assert journal.pending() == []
            assert TruncationJournal(backing).complete_pending() == []
            assert len(os.listdir(backing / ".kmsfs.d" / INTENT_DIR)) == 1
        assert os.listdir(backing / ".kmsfs.d" / INTENT_DIR) == []
    finally:
        os.close(fd)
    assert path.stat().st_size == ciphertext_size(2 * B, B)


def test_a_truncate_that_fails_midway_keeps_its_record_for_the_next_mount(tmp_path: Path):
    backing = plain_store(tmp_path)
    data = os.urandom(3 * B)
    path, dek, file_id = new_file(backing, "f", data)
    fd = os.open(path, os.O_RDWR)
    try:
        cf = CipherFile(fd, ContentCipher(dek, file_id, B), TruncationJournal(backing))

        def failing_pwrite(*args):
            raise OSError(errno.EIO, "disk error")

        real_pwrite = os.pwrite
        os.pwrite = failing_pwrite
        try:
            with pytest.raises(OSError):
                cf.truncate(B + 3)  # cut, then the write of the kept block fails
        finally:
            os.pwrite = real_pwrite
    finally:
        os.close(fd)
    # The kept bytes are only in the record, which stays for the next mount.
    assert path.stat().st_size == ciphertext_size(B, B)
    assert TruncationJournal(backing).complete_pending() == ["f: truncate completed"]
    assert read_all(path, dek, file_id) == data[:B + 3]


def test_records_for_gone_or_replaced_files_and_garbage_are_dropped(tmp_path: Path):
    backing = plain_store(tmp_path)
    data = os.urandom(2 * B)
    path, dek, file_id = new_file(backing, "f", data)
    st = path.stat()
    directory = backing / ".kmsfs.d" / INTENT_DIR
    directory.mkdir()
    # Same inode, other file id (an inode number reused by another file): left alone.
    (directory / "r1").write_bytes(TruncateIntent(st.st_dev, st.st_ino, os.urandom(16), 0, b"y" * 40).to_json())
    (directory / "r2").write_bytes(TruncateIntent(st.st_dev, 999_999_999, file_id, 0, b"y" * 40).to_json())
    (directory / "r3").write_bytes(b"\xff not json")
    (directory / "r4").write_bytes(json.dumps({"version": 99}).encode())
    (directory / ".r5.tmp").write_bytes(b"half a record")  # never renamed: its truncate never started
    done = TruncationJournal(backing).complete_pending()
    assert sorted(done) == sorted([
        f"inode {st.st_ino}: file gone, record dropped",
        "inode 999999999: file gone, record dropped",
        "r3: unreadable record dropped",
        "r4: unreadable record dropped",
    ])
    assert os.listdir(directory) == []
    assert read_all(path, dek, file_id) == data


def test_a_store_truncate_killed_midway_is_completed_by_the_next_mount(store: Store):
    m = store.mount()
    data = os.urandom(4 * B + 1000)
    (m.path / "dir").mkdir()
    with open(m.path / "dir" / "victim", "wb") as fh:
        fh.write(data)
        os.fsync(fh.fileno())
    m.unmount()
    # A process with the store's real envelope (HSM unwrap) truncates and dies between the steps.
    script = KILL_INSIDE_TRUNCATE + textwrap.dedent(f"""
        from kmsfs.fsck import open_store
        backing = Path({str(store.backing)!r})
        keystore, envelope = open_store(backing)
        fd = os.open(backing / "dir" / "victim", os.O_RDWR)
        header = envelope.parse(os.getxattr(fd, "user.kmsfs"))
        truncate(fd, envelope.open(header), backing, {2 * B + 77})
        print("not killed")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True,
                          env=store.env, timeout=60)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr)
    assert (store.backing / "dir" / "victim").stat().st_size == 2 * 4096  # cut at block 2's start
    # fsck changes nothing, finds no damage, and says what the next mount will do.
    result = store.kmsfs("fsck", str(store.backing), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 truncate(s) interrupted by a crash" in result.stdout and "next kmsfs mount completes" in result.stdout
    report = json.loads(store.kmsfs("fsck", "--json", str(store.backing)).stdout)
    assert report["pending_truncates"] == 1 and report["clean"]
    m = store.mount()
    assert (m.path / "dir" / "victim").read_bytes() == data[:2 * B + 77]
    assert "completed the truncate of dir/victim that a crash interrupted" in m.log()
    m.unmount()
    report = json.loads(store.kmsfs("fsck", "--json", str(store.backing)).stdout)
    assert report["pending_truncates"] == 0 and report["clean"]


def test_truncates_through_the_mount_leave_no_record(store: Store):
    m = store.mount()
    path = m.path / "f"
    path.write_bytes(os.urandom(3 * B))
    for size in (2 * B + 5, B, 17, 0):
        os.truncate(path, size)
        assert path.stat().st_size == size
    assert os.listdir(store.backing / ".kmsfs.d" / INTENT_DIR) == []
    m.unmount()


def test_a_record_past_the_end_of_its_file_is_not_applied(tmp_path: Path):
    """The file is shorter than the record's cut (changed outside kmsfs since): left
    alone, with an error in the log, rather than extended with a stale block."""
    backing = plain_store(tmp_path)
    data = os.urandom(B)
    path, dek, file_id = new_file(backing, "f", data)
    st = path.stat()
    directory = backing / ".kmsfs.d" / INTENT_DIR
    directory.mkdir()
    (directory / "r").write_bytes(TruncateIntent(st.st_dev, st.st_ino, file_id, 5 * 4096, b"z" * 40).to_json())
    assert TruncationJournal(backing).complete_pending() == ["f: left alone (shorter than expected)"]
    assert os.listdir(directory) == []
    assert read_all(path, dek, file_id) == data
