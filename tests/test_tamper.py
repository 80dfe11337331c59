"""Tampering with the backing store is detected: EIO, a log line naming the file, no collateral.

Each case writes files through a real mount, unmounts, changes a backing
file with ordinary file I/O or its ``user.kmsfs`` xattr, mounts again and
reads.  The damaged file must fail with EIO, the daemon log must name its
backing path (and the block for content damage), and an untouched file must
still read back correctly.

The last tests pin the cases the v1 format does not detect, as documented in
docs/threat-model.md: truncation at a block boundary, replay of an older
version of a block at its own position, and all-zero blocks (holes).
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from kmsfs.format import BLOCK_OVERHEAD, DEFAULT_BLOCK_SIZE, NONCE_SIZE, TAG_SIZE, ciphertext_size, parse_header

from conftest import Mount, Store

B = DEFAULT_BLOCK_SIZE
CB = B + BLOCK_OVERHEAD
HEADER = "user.kmsfs"
CONTEXT = "user.kmsfs.context"

VICTIM_SIZE = 3 * B + 100  # blocks 0..2 full, block 3 of 100 bytes


def data_for(name: str, size: int) -> bytes:
    return random.Random(name).randbytes(size)


def setup_files(store: Store, files: dict[str, int]) -> dict[str, bytes]:
    """Write the files through a mount and unmount; returns their contents."""
    m = store.mount()
    contents = {}
    for name, size in files.items():
        contents[name] = data_for(name, size)
        path = m.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[name])
    m.unmount()
    return contents


def backing(store: Store, name: str) -> Path:
    return store.backing / name


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        assert len(byte) == 1, f"{path} has no byte at {offset}"
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ (1 << bit)]))


def read_block(path: Path, number: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(number * CB)
        return fh.read(CB)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def set_header(path: Path, raw: bytes) -> None:
    os.setxattr(path, HEADER, raw)


def get_header(path: Path) -> bytes:
    return os.getxattr(path, HEADER)


def assert_eio(path: Path) -> None:
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == errno.EIO, info.value


def assert_logged(m: Mount, name: str, *words: str) -> list[str]:
    """The daemon log has a line naming the backing file, containing every word."""
    where = os.path.realpath(m.store.backing / name) + ":"
    lines = [line for line in m.log().splitlines() if where in line]
    assert lines, f"no log line names {where}:\n{m.log()}"
    for word in words:
        assert any(word in line for line in lines), f"no line about {where} says {word!r}:\n" + "\n".join(lines)
    return lines


def assert_intact(m: Mount, name: str, contents: dict[str, bytes]) -> None:
    assert (m.path / name).read_bytes() == contents[name]


# --------------------------------------------------------------------------- content blocks


BLOCK_FLIPS = {
    # victim name: (block, offset inside the block)
    "nonce0": (0, 3),
    "ciphertext0": (0, NONCE_SIZE + 40),
    "tag0": (0, CB - TAG_SIZE + 5),
    "ciphertext2": (2, NONCE_SIZE + 2000),
    "nonce3": (3, 11),
    "ciphertext3": (3, NONCE_SIZE + 99),
    "tag3": (3, 100 + BLOCK_OVERHEAD - 1),
}


def test_flipped_bit_in_a_block(store):
    """One bit flipped in the nonce, ciphertext or tag of a block (last block too)."""
    contents = setup_files(store, {**{name: VICTIM_SIZE for name in BLOCK_FLIPS}, "other": VICTIM_SIZE})
    for name, (block, offset) in BLOCK_FLIPS.items():
        flip_bit(backing(store, name), block * CB + offset, bit=3)
    m = store.mount()
    for name, (block, _) in BLOCK_FLIPS.items():
        assert_eio(m.path / name)
        assert_logged(m, name, f"block {block}", "authentication failed")
        # stat still works and shows the full size: only the content is refused.
        assert (m.path / name).stat().st_size == VICTIM_SIZE
    assert_intact(m, "other", contents)


def test_read_that_avoids_the_damaged_block_succeeds(store):
    """The kernel reads whole 4 KiB pages; a read fails only if a page it needs
    overlaps the damaged block.  (Format 2's 4068-byte blocks are not page
    aligned in plaintext, so a damaged block fails the two pages it overlaps.)"""
    size = 5 * B + 100  # blocks 0..4 full, block 5 of 100 bytes
    contents = setup_files(store, {"victim": size})
    flip_bit(backing(store, "victim"), 2 * CB + 100)  # block 2: plaintext [8136, 12204)
    m = store.mount()
    data = contents["victim"]
    page = 4096
    fd = os.open(m.path / "victim", os.O_RDONLY)
    try:
        # No readahead: each pread asks the daemon for just its own pages.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(fd, page, 0) == data[:page]
        assert os.pread(fd, 10, 3 * page + 5) == data[3 * page + 5:3 * page + 15]
        assert os.pread(fd, 100, 5 * B) == data[5 * B:]
        for offset in (page, 2 * B, 2 * B + 4000):  # pages 1 and 2 hold part of block 2
            with pytest.raises(OSError) as info:
                os.pread(fd, 1, offset)
            assert info.value.errno == errno.EIO
        # The handle stays usable after the error.
        assert os.pread(fd, page, 0) == data[:page]
    finally:
        os.close(fd)
    assert_logged(m, "victim", "block 2")


def test_swapped_blocks(store):
    contents = setup_files(store, {"victim": VICTIM_SIZE, "other": B})
    path = backing(store, "victim")
    b0, b1 = read_block(path, 0), read_block(path, 1)
    write_at(path, 0, b1)
    write_at(path, CB, b0)
    m = store.mount()
    assert_eio(m.path / "victim")
    assert_logged(m, "victim", "block 0")
    assert_intact(m, "other", contents)


def test_block_copied_from_another_file_at_the_same_position(store):
    contents = setup_files(store, {"victim": VICTIM_SIZE, "donor": VICTIM_SIZE, "other": 10})
    write_at(backing(store, "victim"), CB, read_block(backing(store, "donor"), 1))
    m = store.mount()
    assert_eio(m.path / "victim")
    assert_logged(m, "victim", "block 1")
    assert_intact(m, "donor", contents)
    assert_intact(m, "other", contents)


def test_truncated_inside_the_last_block(store):
    contents = setup_files(store, {"victim": VICTIM_SIZE, "other": 5})
    path = backing(store, "victim")
    assert path.stat().st_size == ciphertext_size(VICTIM_SIZE, B)
    os.truncate(path, 3 * CB + BLOCK_OVERHEAD + 50)  # 50 of the last block's 100 bytes left
    m = store.mount()
    assert (m.path / "victim").stat().st_size == 3 * B + 50
    assert_eio(m.path / "victim")
    assert_logged(m, "victim", "block 3")
    assert_intact(m, "other", contents)


@pytest.mark.parametrize("tail", [1, NONCE_SIZE, BLOCK_OVERHEAD])
def test_truncated_to_a_stub_of_the_last_block(store, tail):
    # Too little is left of the last block to hold even its nonce and tag.
    contents = setup_files(store, {"victim": VICTIM_SIZE, "other": 5})
    os.truncate(backing(store, "victim"), 3 * CB + tail)
    m = store.mount()
    assert (m.path / "victim").stat().st_size == 3 * B
    assert_eio(m.path / "victim")
    assert_logged(m, "victim", "block 3")
    assert_intact(m, "other", contents)


@pytest.mark.parametrize("backing_cached", [True, False], ids=["backing-cached", "backing-on-disk"])
def test_flipped_bit_in_a_big_sequential_read(store, backing_cached):
    """Readahead-sized requests: decrypted on the request loop when the backing
    blocks are in the page cache, in a worker thread when they must come from
    the disk.  Both refuse a damaged block and serve the blocks before it."""
    size = 4 << 20
    contents = setup_files(store, {"victim": size, "other": size})
    damaged = 700  # inside the third MiB
    flip_bit(backing(store, "victim"), damaged * CB + NONCE_SIZE + 9)
    for name in contents:
        path = backing(store, name)
        if backing_cached:
            path.read_bytes()
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    m = store.mount()
    with open(m.path / "victim", "rb") as fh:
        # The damaged MiB first: uncached, its request must go to a worker.
        fh.seek(2 << 20)
        with pytest.raises(OSError) as info:
            fh.read(1 << 20)
        assert info.value.errno == errno.EIO
        fh.seek(0)
        assert fh.read(2 << 20) == contents["victim"][:2 << 20]
    assert_logged(m, "victim", f"block {damaged}", "authentication failed")
    assert_intact(m, "other", contents)


# --------------------------------------------------------------------------- the header


def header_layout(raw: bytes) -> dict[str, int]:
    """The offset of one byte inside each header field."""
    ctx_len = int.from_bytes(raw[44:46], "big")
    assert len(raw) == 46 + ctx_len + 12 + 48
    return {
        "file_id": 8 + 7,
        "key_id": 24 + 3,
        "key_version": 40 + 3,
        "context": 46 + 2,
        "wrap_nonce": 46 + ctx_len + 5,
        "wrapped_dek": 46 + ctx_len + 12 + 20,
        "wrapped_dek_tag": 46 + ctx_len + 12 + 47,
    }


def make_in_context_dir(store: Store, files: dict[str, int], context: bytes) -> dict[str, bytes]:
    m = store.mount()
    d = m.path / "d"
    d.mkdir()
    os.setxattr(d, CONTEXT, context)
    contents = {}
    for name, size in files.items():
        contents[name] = data_for(name, size)
        (m.path / name).write_bytes(contents[name])
    m.unmount()
    return contents


HEADER_FIELDS = ["file_id", "key_id", "key_version", "context", "wrap_nonce", "wrapped_dek", "wrapped_dek_tag"]


def test_flipped_bit_in_the_header(store):
    names = [f"d/{field}" for field in HEADER_FIELDS]
    contents = make_in_context_dir(store, {**{n: 2 * B for n in names}, "d/other": 2 * B}, b'{"dept":"finance"}')
    for field, name in zip(HEADER_FIELDS, names):
        path = backing(store, name)
        raw = bytearray(get_header(path))
        assert b'{"dept":"finance"}' in raw
        raw[header_layout(bytes(raw))[field]] ^= 0x04  # key version 1 becomes 5
        set_header(path, bytes(raw))
    m = store.mount()
    for name in names:
        assert_eio(m.path / name)
        assert_logged(m, name)
    # The causes, as the log gives them.
    assert_logged(m, "d/file_id", "could not unwrap")
    assert_logged(m, "d/key_id", "not known to this store")
    assert_logged(m, "d/key_version", "not in the HSM")
    assert_logged(m, "d/wrap_nonce", "could not unwrap")
    assert_logged(m, "d/wrapped_dek", "could not unwrap")
    assert_logged(m, "d/wrapped_dek_tag", "could not unwrap")
    assert_intact(m, "d/other", contents)


def test_header_copied_from_another_file(store):
    contents = setup_files(store, {"victim": VICTIM_SIZE, "donor": VICTIM_SIZE, "other": 3})
    set_header(backing(store, "victim"), get_header(backing(store, "donor")))
    m = store.mount()
    assert_eio(m.path / "victim")
    # The DEK unwraps fine (the header is genuine), but no block was made under its file id.
    assert_logged(m, "victim", "block 0", "authentication failed")
    assert_intact(m, "donor", contents)
    assert_intact(m, "other", contents)


def test_header_removed_from_a_non_empty_file(store):
    contents = setup_files(store, {"victim": 10, "other": 10})
    os.removexattr(backing(store, "victim"), HEADER)
    m = store.mount()
    assert_eio(m.path / "victim")
    assert_logged(m, "victim", "missing")
    assert_intact(m, "other", contents)


def test_empty_file_without_header_reads_empty_and_can_be_written(store):
    contents = setup_files(store, {"empty": 0, "other": 10})
    path = backing(store, "empty")
    if HEADER in os.listxattr(path):
        os.removexattr(path, HEADER)
    (store.backing / "planted").touch()  # created behind the daemon's back
    m = store.mount()
    for name in ("empty", "planted"):
        assert (m.path / name).read_bytes() == b""
        assert (m.path / name).stat().st_size == 0
        (m.path / name).write_bytes(b"now encrypted " + name.encode())
        assert (m.path / name).read_bytes() == b"now encrypted " + name.encode()
        parse_header(get_header(backing(store, name)))  # it has a valid header now
        assert b"now encrypted" not in backing(store, name).read_bytes()
    assert_intact(m, "other", contents)
    m.unmount()
    m2 = store.mount()
    assert (m2.path / "planted").read_bytes() == b"now encrypted planted"


GARBLES = {
    "random": ("bad header", "magic"),
    "truncated": ("bad header", "too short"),
    "too_long": ("bad header", "does not match"),
    "too_short": ("bad header", "too short"),
    "empty": ("bad header", "too short"),
    # Format 1 reads block_size_log2 12 as 4096-byte plaintext blocks: refused,
    # never misread as this format-2 store's 4068-byte blocks.
    "version1": ("header format 1 with block size 4096 differs", "format 2, block size 4068"),
    "version3": ("bad header", "version 3 is not supported"),
    "version0": ("bad header", "version 0 is not supported"),
    "flags": ("bad header", "flags"),
    "block_size": ("bad header", "block size"),
    "other_block_size": ("block size 8164 differs",),
}


def garbled(raw: bytes, how: str) -> bytes:
    return {
        "random": random.Random(1).randbytes(len(raw)),
        "truncated": raw[:-1],
        "too_long": raw + b"\0",
        "too_short": raw[:30],
        "empty": b"",
        "version1": raw[:4] + b"\x01" + raw[5:],
        "version3": raw[:4] + b"\x03" + raw[5:],
        "version0": raw[:4] + b"\x00" + raw[5:],
        "flags": raw[:5] + b"\x01" + raw[6:],
        "block_size": raw[:6] + b"\x0b" + raw[7:],
        "other_block_size": raw[:6] + b"\x0d" + raw[7:],
    }[how]


def test_garbled_header(store):
    contents = setup_files(store, {**{name: B + 1 for name in GARBLES}, "other": B + 1})
    for name in GARBLES:
        path = backing(store, name)
        set_header(path, garbled(get_header(path), name))
    m = store.mount()
    for name, words in GARBLES.items():
        assert_eio(m.path / name)
        assert_logged(m, name, *words)
    assert_intact(m, "other", contents)


def test_changed_encryption_context_fails_to_unwrap(store):
    contents = make_in_context_dir(store, {"d/victim": 100, "d/other": 100}, b'{"dept":"finance"}')
    path = backing(store, "d/victim")
    raw = get_header(path)
    assert parse_header(raw).context == b'{"dept":"finance"}'
    edited = raw.replace(b'{"dept":"finance"}', b'{"dept":"payroll"}')
    assert edited != raw and len(edited) == len(raw)
    header = parse_header(edited)  # still a well-formed header ...
    assert header.context_dict == {"dept": "payroll"}
    set_header(path, edited)
    m = store.mount()
    assert_eio(m.path / "d/victim")  # ... but the HSM refuses to unwrap under it
    assert_logged(m, "d/victim", "could not unwrap")
    assert_intact(m, "d/other", contents)
    assert os.getxattr(m.path / "d/other", CONTEXT) == b'{"dept":"finance"}'


def test_empty_context_on_a_subdirectory_clears_the_inherited_one(mounted):
    d = mounted.path / "d"
    (d / "sub").mkdir(parents=True)
    os.setxattr(d, CONTEXT, b'{"dept":"finance"}')
    os.setxattr(d / "sub", CONTEXT, b"{}")
    (d / "f").write_bytes(b"with context")
    (d / "sub" / "g").write_bytes(b"without context")
    assert os.getxattr(d / "f", CONTEXT) == b'{"dept":"finance"}'
    assert (d / "sub" / "g").read_bytes() == b"without context"
    with pytest.raises(OSError) as info:
        os.getxattr(d / "sub" / "g", CONTEXT)
    assert info.value.errno == errno.ENODATA
    assert parse_header(get_header(mounted.store.backing / "d/sub/g")).context == b""


# --------------------------------------------------------------------------- while mounted


def test_tampering_while_mounted_is_seen_at_the_next_open(store):
    m = store.mount()
    contents = {name: data_for(name, 2 * B) for name in ("victim", "victim2", "other")}
    for name, data in contents.items():
        (m.path / name).write_bytes(data)
        assert (m.path / name).read_bytes() == data  # now in the page cache
    flip_bit(backing(store, "victim"), CB + 200)
    assert_eio(m.path / "victim")
    assert_logged(m, "victim", "block 1")
    os.removexattr(backing(store, "victim2"), HEADER)
    assert_eio(m.path / "victim2")
    assert_logged(m, "victim2", "missing")
    assert_intact(m, "other", contents)
    # Repaired behind the daemon's back: readable again at the next open.
    flip_bit(backing(store, "victim"), CB + 200)
    assert_intact(m, "victim", contents)


# --------------------------------------------------------------------------- known undetected cases


def test_known_gap_truncation_at_a_block_boundary_shortens_silently(store):
    contents = setup_files(store, {"victim": VICTIM_SIZE})
    os.truncate(backing(store, "victim"), 2 * CB)
    m = store.mount()
    data = (m.path / "victim").read_bytes()
    assert data == contents["victim"][:2 * B]  # no error: v1 does not record the file size
    assert (m.path / "victim").stat().st_size == 2 * B
    os.truncate(backing(store, "victim"), 0)
    assert (m.path / "victim").read_bytes() == b""


def test_known_gap_replayed_older_block_is_accepted(store):
    m = store.mount()
    path = m.path / "victim"
    old = data_for("old", VICTIM_SIZE)
    path.write_bytes(old)
    old_block1 = read_block(backing(store, "victim"), 1)
    new = bytearray(old)
    new[B:2 * B] = b"N" * B
    with open(path, "r+b") as fh:
        fh.seek(B)
        fh.write(b"N" * B)
    assert path.read_bytes() == bytes(new)
    m.unmount()
    write_at(backing(store, "victim"), CB, old_block1)  # roll block 1 back
    m2 = store.mount()
    assert (m2.path / "victim").read_bytes() == old  # accepted: same DEK, file id and position
    # Replaying it at another position of the same file is still caught.
    m2.unmount()
    write_at(backing(store, "victim"), 2 * CB, old_block1)
    m3 = store.mount()
    assert_eio(m3.path / "victim")
    assert_logged(m3, "victim", "block 2")


def test_known_gap_full_zero_block_reads_as_zeros(store):
    contents = setup_files(store, {"victim": VICTIM_SIZE, "short": 2 * B + 100})
    write_at(backing(store, "victim"), CB, bytes(CB))
    # A zeroed partial last block is not a hole: it is detected.
    write_at(backing(store, "short"), 2 * CB, bytes(100 + BLOCK_OVERHEAD))
    m = store.mount()
    expected = bytearray(contents["victim"])
    expected[B:2 * B] = bytes(B)
    assert (m.path / "victim").read_bytes() == bytes(expected)
    assert_eio(m.path / "short")
    assert_logged(m, "short", "block 2")
