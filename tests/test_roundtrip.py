"""Round trips of file contents through a real mount on a real SoftHSM2 token."""

from __future__ import annotations

import os
import random

import pytest

from kmsfs.format import BLOCK_OVERHEAD, DEFAULT_BLOCK_SIZE, ciphertext_size

B = DEFAULT_BLOCK_SIZE

SIZES = [0, 1, B - 1, B, B + 1, 2 * B, 3 * B + 17, 5 * 1024 * 1024 + 3]


@pytest.mark.parametrize("size", SIZES)
def test_write_read_persist_and_ciphertext_on_disk(store, size):
    m = store.mount()
    data = random.Random(size).randbytes(size)
    path = m.path / "f.bin"
    path.write_bytes(data)
    assert path.read_bytes() == data
    assert path.stat().st_size == size
    backing = store.backing / "f.bin"
    assert backing.stat().st_size == ciphertext_size(size, B)
    raw = backing.read_bytes()
    if size >= 16:
        assert data[:16] not in raw
    m.unmount()
    m2 = store.mount()
    assert (m2.path / "f.bin").read_bytes() == data
    assert (m2.path / "f.bin").stat().st_size == size


def test_random_offset_writes_reads_truncates_appends(store):
    m = store.mount()
    rng = random.Random(7)
    path = m.path / "r.bin"
    model = bytearray()
    with open(path, "w+b", buffering=0) as fh:
        for _ in range(300):
            op = rng.random()
            if op < 0.45:
                off = rng.randrange(0, len(model) + 3 * B + 1)
                chunk = rng.randbytes(rng.choice([1, 7, B - 1, B, B + 1, 3 * B + 5, rng.randrange(1, 40000)]))
                fh.seek(off)
                fh.write(chunk)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(chunk)] = chunk
            elif op < 0.65:
                new = rng.randrange(0, len(model) + 2 * B + 1)
                fh.truncate(new)
                if new < len(model):
                    del model[new:]
                else:
                    model.extend(bytes(new - len(model)))
            elif op < 0.8:
                chunk = rng.randbytes(rng.randrange(1, 3 * B))
                fh.seek(0, os.SEEK_END)
                fh.write(chunk)
                model.extend(chunk)
            else:
                off = rng.randrange(0, len(model) + 10)
                n = rng.randrange(0, 5 * B)
                fh.seek(off)
                assert fh.read(n) == bytes(model[off:off + n])
            assert os.fstat(fh.fileno()).st_size == len(model)
    assert path.read_bytes() == bytes(model)
    m.unmount()
    m2 = store.mount()
    assert (m2.path / "r.bin").read_bytes() == bytes(model)


def test_o_append_writes_at_end(mounted):
    path = mounted.path / "log.txt"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"def")
        os.write(fd, b"g" * (2 * B))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abcdef" + b"g" * (2 * B)


def test_o_trunc_and_o_excl(mounted):
    path = mounted.path / "t.txt"
    path.write_bytes(b"x" * (3 * B))
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"short")
    os.close(fd)
    assert path.read_bytes() == b"short"
    with pytest.raises(FileExistsError):
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fd = os.open(mounted.path / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    assert (mounted.path / "new").stat().st_mode & 0o777 == 0o640


def test_sparse_write_and_extending_truncate_read_zeros(store):
    m = store.mount()
    path = m.path / "sparse"
    with open(path, "wb") as fh:
        fh.write(b"head")
        fh.seek(10 * B + 5)
        fh.write(b"tail")
    data = path.read_bytes()
    assert data == b"head" + bytes(10 * B + 1) + b"tail"
    os.truncate(path, 64 * B)
    assert path.read_bytes() == data + bytes(64 * B - len(data))
    os.truncate(path, 3 * B + 1)
    assert path.read_bytes() == (data + bytes(64 * B))[:3 * B + 1]
    # Whole zero blocks are holes on disk: the backing file is sparse.
    big = m.path / "hole"
    os.truncate(big, 0) if big.exists() else big.touch()
    os.truncate(big, 256 * B)
    assert big.read_bytes() == bytes(256 * B)
    assert (store.backing / "hole").stat().st_blocks * 512 < 256 * B
    m.unmount()
    m2 = store.mount()
    assert (m2.path / "sparse").read_bytes() == (data + bytes(64 * B))[:3 * B + 1]


def test_open_unlinked_file_keeps_working(mounted):
    path = mounted.path / "gone"
    with open(path, "w+b", buffering=0) as fh:
        fh.write(b"1" * (B + 10))
        os.unlink(path)
        assert not path.exists()
        fh.write(b"2" * 100)
        fh.seek(0)
        assert fh.read() == b"1" * (B + 10) + b"2" * 100
        assert os.fstat(fh.fileno()).st_size == B + 110


def test_plaintext_size_follows_from_ciphertext_size(mounted):
    for size in (1, B - 1, B, B + 1):
        p = mounted.path / f"s{size}"
        p.write_bytes(b"z" * size)
        assert (mounted.store.backing / f"s{size}").stat().st_size == size + BLOCK_OVERHEAD * -(-size // B)


def test_umount_command_and_background_mount(store):
    mnt = store.root / "bg"
    mnt.mkdir()
    result = store.kmsfs("mount", str(store.backing), str(mnt))
    try:
        assert "mounted" in result.stdout
        (mnt / "x").write_text("background")
        store.kmsfs("umount", str(mnt))
        from conftest import is_mounted
        assert not is_mounted(mnt)
        m = store.mount()
        assert (m.path / "x").read_text() == "background"
    finally:
        from conftest import is_mounted
        if is_mounted(mnt):
            store.kmsfs("umount", str(mnt), check=False)


def test_writeback_cache_option_keeps_contents_appends_and_sizes(store):
    """-o writeback_cache: the kernel batches writes and places O_APPEND itself."""
    m = store.mount(None, "writeback_cache")
    assert "writeback cache on" in m.log()
    rng = random.Random(11)
    model = bytearray()
    path = m.path / "wb.bin"
    with open(path, "w+b", buffering=0) as fh:
        for _ in range(200):
            op = rng.random()
            if op < 0.5:
                off = rng.randrange(0, len(model) + 2 * B + 1)
                chunk = rng.randbytes(rng.choice([1, 100, B - 1, B, B + 1, 3 * B + 5]))
                fh.seek(off)
                fh.write(chunk)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(chunk)] = chunk
            elif op < 0.7:
                new = rng.randrange(0, len(model) + 2 * B + 1)
                fh.truncate(new)
                del model[new:]
                model.extend(bytes(new - len(model)))
            else:
                off = rng.randrange(0, len(model) + 10)
                fh.seek(off)
                assert fh.read(2 * B) == bytes(model[off:off + 2 * B])
        os.fsync(fh.fileno())
    log = m.path / "append.log"
    log.write_bytes(b"start\n")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(50):
            os.write(fd, f"line {i}\n".encode())
    finally:
        os.close(fd)
    expected_log = b"start\n" + b"".join(f"line {i}\n".encode() for i in range(50))
    assert log.read_bytes() == expected_log
    m.unmount()
    m2 = store.mount()
    assert (m2.path / "wb.bin").read_bytes() == bytes(model)
    assert (m2.path / "append.log").read_bytes() == expected_log


def test_a_format_1_store_is_still_read_and_written(store):
    """Stores made before format 2 keep working, with format 1's geometry
    (4096-byte plaintext blocks, 4124 on disk) for every file they get."""
    import json

    from kmsfs.format import parse_header

    config_path = store.backing / ".kmsfs.d" / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"format": 1, "block_size": 4096})
    config_path.write_text(json.dumps(config))
    m = store.mount()
    data = random.Random(1).randbytes(3 * 4096 + 17)
    (m.path / "old").write_bytes(data)
    with open(m.path / "old", "r+b") as fh:  # a read-modify-write across a block boundary
        fh.seek(4090)
        fh.write(b"X" * 10)
    data = data[:4090] + b"X" * 10 + data[4100:]
    os.truncate(m.path / "old", 2 * 4096 + 5)  # into a block: through the truncate intent
    data = data[:2 * 4096 + 5]
    assert (m.path / "old").read_bytes() == data
    status = json.loads((m.path / ".kmsfs" / "status").read_bytes())
    assert status["format_version"] == 1 and status["block_size"] == 4096
    m.unmount()
    backing = store.backing / "old"
    header = parse_header(os.getxattr(backing, "user.kmsfs"))
    assert header.version == 1 and header.block_size == 4096
    assert backing.stat().st_size == ciphertext_size(len(data), 4096) == 2 * 4124 + 5 + BLOCK_OVERHEAD
    m = store.mount()
    assert (m.path / "old").read_bytes() == data
    assert os.stat(m.path / "old").st_blksize == 4096
    m.unmount()
    result = store.kmsfs("fsck", str(store.backing), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
