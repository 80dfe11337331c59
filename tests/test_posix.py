"""POSIX semantics through a real mount: metadata, names, links, renames,
special files, xattrs (plain and kmsfs-reserved) and directory listings.

Every test runs against the real daemon on a real SoftHSM2 token and, where
it matters, checks the backing store as well as the plaintext view.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import random
import select
import shutil
import socket
import struct
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from kmsfs.format import (
    BLOCK_OVERHEAD,
    DEFAULT_BLOCK_SIZE,
    ciphertext_size,
    parse_header,
)

B = DEFAULT_BLOCK_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def raw_header(backing_file: Path) -> bytes:
    return os.getxattr(backing_file, "user.kmsfs")


#: The virtual control directory at the mount root (not in the backing tree).
CONTROL = ".kmsfs"


def names(directory) -> list:
    """os.listdir of a directory in the mount, without the virtual control directory."""
    control = os.fsencode(CONTROL) if isinstance(directory, bytes) else CONTROL
    return sorted(n for n in os.listdir(directory) if n != control)


def read_all(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def oserror(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


# ============================================================================ attributes


def test_chmod_through_mount_and_backing(mounted):
    path = mounted.path / "f"
    path.write_bytes(b"data")
    for mode in (0o600, 0o755, 0o4750, 0o000, 0o644):
        os.chmod(path, mode)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert stat.S_IMODE((mounted.store.backing / "f").stat().st_mode) == mode
    d = mounted.path / "d"
    d.mkdir()
    os.chmod(d, 0o711)
    assert stat.S_IMODE(d.stat().st_mode) == 0o711
    assert stat.S_IMODE((mounted.store.backing / "d").stat().st_mode) == 0o711
    assert path.read_bytes() == b"data"


@pytest.mark.parametrize("open_flags", [os.O_WRONLY, os.O_RDWR], ids=["write-only", "read-write"])
def test_writes_by_root_keep_set_id_bits(mounted, tmp_path, open_flags):
    """What a write does to set-id bits, as on the backing filesystem (ext4):
    a writer with CAP_FSETID (root) keeps them.  Write-only opens are direct
    (fs._serves_direct), read-write ones go through the page cache; both agree.
    Writers without CAP_FSETID are in test_hostile's permission table."""
    if os.geteuid() != 0:
        pytest.skip("the rule for writers with CAP_FSETID needs root")
    for base in (mounted.path, tmp_path):
        for mode in (0o4755, 0o2755, 0o2644, 0o6777):
            path = base / f"setid-{mode:o}"
            path.write_bytes(b"before")
            os.chmod(path, mode)
            fd = os.open(path, open_flags)
            try:
                assert os.pwrite(fd, b"after", 0) == 5
            finally:
                os.close(fd)
            assert stat.S_IMODE(path.stat().st_mode) == mode, (base, oct(mode))
            assert path.read_bytes() == b"aftere"


def test_chown_as_root(mounted):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    path = mounted.path / "owned"
    path.write_bytes(b"x" * 100)
    os.chown(path, 1234, 5678)
    for st in (path.stat(), (mounted.store.backing / "owned").stat()):
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(path, -1, 42)
    for st in (path.stat(), (mounted.store.backing / "owned").stat()):
        assert (st.st_uid, st.st_gid) == (1234, 42)
    # A symlink itself (lchown) and a directory.
    link = mounted.path / "ln"
    os.symlink("owned", link)
    os.lchown(link, 77, 88)
    st = os.lstat(mounted.store.backing / "ln")
    assert (st.st_uid, st.st_gid) == (77, 88)
    assert (os.lstat(link).st_uid, os.lstat(link).st_gid) == (77, 88)
    d = mounted.path / "dir"
    d.mkdir()
    os.chown(d, 1234, 5678)
    assert (d.stat().st_uid, d.stat().st_gid) == (1234, 5678)
    assert path.read_bytes() == b"x" * 100


def test_utimens_of_one_time_keeps_the_other(mounted):
    """touch -a / -m: utimensat with UTIME_OMIT for the other time."""
    path = mounted.path / "t"
    path.write_bytes(b"hello")
    backing = mounted.store.backing / "t"
    os.utime(path, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    subprocess.run(["touch", "-a", "-d", "@1700000000.25", str(path)], check=True)
    for st in (path.stat(), backing.stat()):
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_700_000_000_250_000_000, 1_600_000_000_987_654_321)
    subprocess.run(["touch", "-m", "-d", "@1800000000.5", str(path)], check=True)
    for st in (path.stat(), backing.stat()):
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_700_000_000_250_000_000, 1_800_000_000_500_000_000)
    assert path.read_bytes() == b"hello"


def test_utimens_explicit_and_now(mounted):
    path = mounted.path / "t"
    path.write_bytes(b"hello")
    backing = mounted.store.backing / "t"
    atime_ns = 1_000_000_000 * 1_500_000_000 + 123_456_789
    mtime_ns = 1_000_000_000 * 1_600_000_000 + 987_654_321
    os.utime(path, ns=(atime_ns, mtime_ns))
    for st in (path.stat(), backing.stat()):
        assert st.st_atime_ns == atime_ns
        assert st.st_mtime_ns == mtime_ns
    # Seconds-based form.
    os.utime(path, (1_000_000, 2_000_000))
    assert path.stat().st_mtime == 2_000_000
    assert path.stat().st_atime == 1_000_000
    # touch: both times set to now (UTIME_NOW).
    before = time.time()
    os.utime(path)
    after = time.time()
    for st in (path.stat(), backing.stat()):
        assert before - 2 <= st.st_mtime <= after + 2
        assert before - 2 <= st.st_atime <= after + 2
    # Directories and symlinks (without following) too.
    d = mounted.path / "d"
    d.mkdir()
    os.utime(d, ns=(atime_ns, mtime_ns))
    assert d.stat().st_mtime_ns == mtime_ns
    link = mounted.path / "l"
    os.symlink("t", link)
    os.utime(link, ns=(atime_ns, mtime_ns), follow_symlinks=False)
    assert os.lstat(link).st_mtime_ns == mtime_ns
    assert os.lstat(mounted.store.backing / "l").st_mtime_ns == mtime_ns
    assert path.stat().st_mtime_ns != mtime_ns
    assert path.read_bytes() == b"hello"


def test_write_updates_mtime(mounted):
    path = mounted.path / "m"
    path.write_bytes(b"a")
    os.utime(path, ns=(10**18, 10**18))
    with open(path, "r+b") as fh:
        fh.write(b"b")
    assert path.stat().st_mtime_ns != 10**18
    assert path.read_bytes() == b"b"


@pytest.mark.parametrize("how", ["path", "fd"])
def test_truncate_shrink_mid_block_and_extend_with_zeros(mounted, how):
    path = mounted.path / f"trunc-{how}"
    data = random.Random(1).randbytes(3 * B + 100)
    path.write_bytes(data)
    backing = mounted.store.backing / path.name

    def truncate(size: int) -> None:
        if how == "path":
            os.truncate(path, size)
        else:
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
                assert os.fstat(fd).st_size == size
            finally:
                os.close(fd)

    expected = bytearray(data)
    for size in (2 * B + 1000, B + 1, B, B - 1, 5 * B + 7, 5 * B + 7, 10 * B, 17, 0, 3, B + 2):
        truncate(size)
        if size < len(expected):
            del expected[size:]
        else:
            expected.extend(bytes(size - len(expected)))
        assert path.stat().st_size == size
        assert backing.stat().st_size == ciphertext_size(size, B)
        assert path.read_bytes() == bytes(expected)


def test_ftruncate_on_open_handle_then_write(mounted):
    path = mounted.path / "ft"
    with open(path, "w+b", buffering=0) as fh:
        fh.write(b"A" * (2 * B + 10))
        os.ftruncate(fh.fileno(), B + 5)
        fh.seek(0)
        assert fh.read() == b"A" * (B + 5)
        os.ftruncate(fh.fileno(), 3 * B)
        fh.seek(3 * B)
        fh.write(b"Z")
        fh.seek(0)
        assert fh.read() == b"A" * (B + 5) + bytes(2 * B - 5) + b"Z"
    assert path.read_bytes() == b"A" * (B + 5) + bytes(2 * B - 5) + b"Z"


# ============================================================================ directories


def test_mkdir_rmdir_and_enotempty(mounted):
    d = mounted.path / "a" / "b" / "c"
    d.mkdir(parents=True)
    assert d.is_dir()
    assert (mounted.store.backing / "a" / "b" / "c").is_dir()
    (d / "f").write_bytes(b"1")
    assert oserror(os.rmdir, mounted.path / "a") == errno.ENOTEMPTY
    assert oserror(os.rmdir, d) == errno.ENOTEMPTY
    assert oserror(os.mkdir, d) == errno.EEXIST
    assert oserror(os.rmdir, d / "f") == errno.ENOTDIR
    assert oserror(os.unlink, d) in (errno.EISDIR, errno.EPERM)
    os.unlink(d / "f")
    os.rmdir(d)
    assert not d.exists()
    assert not (mounted.store.backing / "a" / "b" / "c").exists()
    os.rmdir(mounted.path / "a" / "b")
    os.rmdir(mounted.path / "a")
    assert names(mounted.path) == []
    assert oserror(os.rmdir, mounted.path / "nonexistent") == errno.ENOENT


def test_nlink_of_directories(mounted):
    d = mounted.path / "top"
    d.mkdir()
    for i in range(3):
        (d / f"sub{i}").mkdir()
    assert d.stat().st_nlink == (mounted.store.backing / "top").stat().st_nlink


def test_readdir_matches_backing_minus_store_dir(mounted):
    created = ["plain", "with space", "dir1", ".hidden", "a" * 200]
    for name in created:
        if name.startswith("dir"):
            (mounted.path / name).mkdir()
        else:
            (mounted.path / name).write_bytes(name.encode())
    os.symlink("plain", mounted.path / "sym")
    listed = names_of_root = sorted(os.listdir(mounted.path))
    backing = sorted(n for n in os.listdir(mounted.store.backing) if n != ".kmsfs.d")
    assert ".kmsfs.d" in os.listdir(mounted.store.backing)
    assert ".kmsfs.d" not in listed
    if CONTROL in listed:
        # The control directory is virtual: listed, but not in the backing tree.
        assert CONTROL not in backing
        assert (mounted.path / CONTROL).is_dir()
        listed = [n for n in listed if n != CONTROL]
    assert listed == backing == sorted(created + ["sym"])
    scanned = {e.name: e for e in os.scandir(mounted.path)}
    assert set(scanned) == set(names_of_root)
    assert scanned["dir1"].is_dir()
    assert scanned["sym"].is_symlink()
    assert scanned["plain"].is_file()
    assert scanned["plain"].stat().st_size == len(b"plain")
    # Subdirectory listings are the backing listings as they are.
    sub = mounted.path / "dir1"
    for i in range(5):
        (sub / f"n{i}").write_bytes(b"x" * i)
    assert sorted(os.listdir(sub)) == sorted(os.listdir(mounted.store.backing / "dir1"))


def test_store_dir_is_invisible_and_reserved(mounted):
    mnt = mounted.path
    assert ".kmsfs.d" not in os.listdir(mnt)
    assert ".kmsfs.d" not in [e.name for e in os.scandir(mnt)]
    assert not os.path.lexists(mnt / ".kmsfs.d")
    assert oserror(os.stat, mnt / ".kmsfs.d") == errno.ENOENT
    assert oserror(os.lstat, mnt / ".kmsfs.d") == errno.ENOENT
    assert oserror(os.listdir, mnt / ".kmsfs.d") == errno.ENOENT
    assert oserror(os.stat, mnt / ".kmsfs.d" / "config.json") == errno.ENOENT
    assert oserror(open, mnt / ".kmsfs.d" / "keys.json", "rb") == errno.ENOENT
    assert oserror(os.getxattr, mnt / ".kmsfs.d", "user.x") == errno.ENOENT
    # ".kmsfs" is either absent or kmsfs's own virtual control directory.
    control = os.path.lexists(mnt / CONTROL)
    if control:
        assert (mnt / CONTROL).is_dir()
        control_ino = os.lstat(mnt / CONTROL).st_ino
    else:
        assert oserror(os.lstat, mnt / CONTROL) == errno.ENOENT

    (mnt / "src").write_bytes(b"src")
    (mnt / "dir").mkdir()
    attempts = [
        ("mkdir", lambda t: os.mkdir(t)),
        ("create", lambda t: os.close(os.open(t, os.O_CREAT | os.O_WRONLY, 0o644))),
        ("create-excl", lambda t: os.close(os.open(t, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))),
        ("symlink", lambda t: os.symlink("src", t)),
        ("link", lambda t: os.link(mnt / "src", t)),
        ("rename-file", lambda t: os.rename(mnt / "src", t)),
        ("rename-dir", lambda t: os.rename(mnt / "dir", t)),
        ("mkfifo", lambda t: os.mkfifo(t)),
    ]
    for name in (".kmsfs.d", CONTROL):
        target = mnt / name
        for what, attempt in attempts:
            code = oserror(attempt, target)
            if name == ".kmsfs.d" or not control:
                assert code == errno.EPERM, (name, what, errno.errorcode[code])
            else:
                assert code in (errno.EPERM, errno.EEXIST, errno.EISDIR, errno.EACCES), (what, code)
        assert oserror(os.rmdir, target) in ((errno.ENOENT,) if name == ".kmsfs.d" or not control
                                             else (errno.EPERM, errno.EACCES, errno.EBUSY, errno.ENOTEMPTY))
        assert oserror(os.unlink, target) in ((errno.ENOENT,) if name == ".kmsfs.d" or not control
                                              else (errno.EPERM, errno.EACCES, errno.EISDIR))
    # The store is untouched, nothing was created, the sources are still there.
    assert (mounted.store.backing / ".kmsfs.d" / "config.json").is_file()
    assert not os.path.lexists(mounted.store.backing / ".kmsfs")
    assert sorted(os.listdir(mounted.store.backing)) == [".kmsfs.d", "dir", "src"]
    assert (mnt / "src").read_bytes() == b"src"
    if control:
        assert os.lstat(mnt / CONTROL).st_ino == control_ino
    # The names are only reserved at the root.
    (mnt / "dir" / ".kmsfs.d").mkdir()
    (mnt / "dir" / ".kmsfs").write_bytes(b"fine here")
    assert sorted(os.listdir(mnt / "dir")) == [".kmsfs", ".kmsfs.d"]
    assert (mnt / "dir" / ".kmsfs").read_bytes() == b"fine here"
    assert names(mnt) == ["dir", "src"]
    # '..' at the root stays at the root.
    assert os.path.samestat(os.stat(mnt / "dir" / ".."), os.stat(mnt))


def test_many_files_listdir_and_scandir(mounted):
    d = mounted.path / "many"
    d.mkdir()
    rng = random.Random(500)
    sizes = {}
    for i in range(500):
        size = rng.choice([0, 1, B - 1, B, B + 1, rng.randrange(0, 3 * B)])
        name = f"file-{i:04d}"
        with open(d / name, "wb") as fh:
            fh.write(bytes([i % 256]) * size)
        sizes[name] = size
    assert sorted(os.listdir(d)) == sorted(sizes)
    assert len(os.listdir(d)) == 500
    seen = {}
    with os.scandir(d) as it:
        for entry in it:
            assert entry.is_file(follow_symlinks=False)
            seen[entry.name] = entry.stat().st_size
    assert seen == sizes
    assert sorted(os.listdir(mounted.store.backing / "many")) == sorted(sizes)
    for name in rng.sample(sorted(sizes), 20):
        i = int(name.split("-")[1])
        assert (d / name).read_bytes() == bytes([i % 256]) * sizes[name]
    # `ls -l` sees the same sizes.
    out = subprocess.run(["ls", "-ln", str(d)], capture_output=True, text=True, check=True).stdout
    ls_sizes = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        ls_sizes[fields[-1]] = int(fields[4])
    assert ls_sizes == sizes


# ============================================================================ names


def test_names_with_spaces_newlines_and_non_utf8(mounted):
    mnt = os.fsencode(mounted.path)
    backing = os.fsencode(mounted.store.backing)
    created = [
        b"with space", b" leading", b"trailing ", b"new\nline", b"tab\there",
        b"bad\xff\xfeutf8", b"\xc3\x28", b"\xe2\x82", "ünïcödé-名前".encode(), b"-dash", b"*?[]",
        b"x" * 255,
    ]
    for i, name in enumerate(created):
        with open(os.path.join(mnt, name), "wb") as fh:
            fh.write(name * (i + 1))
    listed = set(names(mnt))
    assert listed == set(created)
    assert set(os.listdir(backing)) - {b".kmsfs.d"} == set(created)
    for i, name in enumerate(created):
        assert read_all(os.path.join(mnt, name)) == name * (i + 1)
        assert os.stat(os.path.join(mnt, name)).st_size == len(name) * (i + 1)
    # Directories with such names, renames between such names.
    d = os.path.join(mnt, b"dir \xff\nname")
    os.mkdir(d)
    os.rename(os.path.join(mnt, b"bad\xff\xfeutf8"), os.path.join(d, b"moved \xfe"))
    assert os.listdir(d) == [b"moved \xfe"]
    assert read_all(os.path.join(d, b"moved \xfe")) == b"bad\xff\xfeutf8" * 6


def test_name_length_limits(mounted):
    mnt = os.fsencode(mounted.path)
    longest = b"n" * 255
    with open(os.path.join(mnt, longest), "wb") as fh:
        fh.write(b"255")
    assert names(mnt) == [longest]
    assert read_all(os.path.join(mnt, longest)) == b"255"
    os.mkdir(os.path.join(mnt, b"d" * 255))
    os.symlink(b"t" * 255, os.path.join(mnt, b"s" * 255))
    assert os.readlink(os.path.join(mnt, b"s" * 255)) == b"t" * 255
    assert oserror(os.open, os.path.join(mnt, b"n" * 256), os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
    assert oserror(os.mkdir, os.path.join(mnt, b"d" * 256)) == errno.ENAMETOOLONG
    # A multibyte name of exactly 255 bytes.
    name = ("é" * 127 + "x").encode()
    assert len(name) == 255
    with open(os.path.join(mnt, name), "wb") as fh:
        fh.write(b"ok")
    assert read_all(os.path.join(mnt, name)) == b"ok"


def test_created_file_modes_honour_umask(mounted):
    old = os.umask(0o022)
    try:
        fd = os.open(mounted.path / "m640", os.O_CREAT | os.O_WRONLY, 0o640)
        os.close(fd)
        fd = os.open(mounted.path / "m777", os.O_CREAT | os.O_WRONLY, 0o777)
        os.close(fd)
        fd = os.open(mounted.path / "m600", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.write(fd, b"x")
        os.close(fd)
        os.mkdir(mounted.path / "d777", 0o777)
        os.mkdir(mounted.path / "d700", 0o700)
        os.mkfifo(mounted.path / "p666", 0o666)
        os.umask(0o077)
        fd = os.open(mounted.path / "m666-077", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    expected = {"m640": 0o640, "m777": 0o755, "m600": 0o600, "d777": 0o755, "d700": 0o700,
                "p666": 0o644, "m666-077": 0o600}
    for name, mode in expected.items():
        assert stat.S_IMODE((mounted.path / name).stat().st_mode) == mode, name
        assert stat.S_IMODE((mounted.store.backing / name).stat().st_mode) == mode, name


@pytest.mark.parametrize("size", [0, 1, B - 1, B, B + 1, 2 * B - 1, 2 * B, 2 * B + 1, 10 * B + 4095])
def test_st_size_around_block_boundaries(mounted, size):
    path = mounted.path / f"s{size}"
    path.write_bytes(b"\xa5" * size)
    assert path.stat().st_size == size
    assert os.lstat(path).st_size == size
    backing_size = (mounted.store.backing / path.name).stat().st_size
    assert backing_size == ciphertext_size(size, B) == size + BLOCK_OVERHEAD * -(-size // B)
    out = subprocess.run(["ls", "-ln", str(path)], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[4]) == size
    with os.scandir(mounted.path) as it:
        assert {e.name: e.stat().st_size for e in it}[path.name] == size
    # Also after a remount-free re-lookup via a fresh handle.
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == size
        assert os.lseek(fd, 0, os.SEEK_END) == size
    finally:
        os.close(fd)


# ============================================================================ links


def test_symlinks_relative_and_absolute(mounted):
    mnt = mounted.path
    (mnt / "dir").mkdir()
    (mnt / "dir" / "target.txt").write_bytes(b"through the link")
    os.symlink("dir/target.txt", mnt / "rel")
    os.symlink("../dir/target.txt", mnt / "dir" / "up")  # not a loop: ../dir/target.txt
    absolute = str(mnt / "dir" / "target.txt")
    os.symlink(absolute, mnt / "abs")
    os.symlink("/nonexistent/dangling", mnt / "dangling")
    os.symlink("dir", mnt / "dirlink")
    assert os.readlink(mnt / "rel") == "dir/target.txt"
    assert os.readlink(mnt / "dir" / "up") == "../dir/target.txt"
    assert os.readlink(mnt / "abs") == absolute
    assert os.readlink(mnt / "dangling") == "/nonexistent/dangling"
    # Symlink targets are stored as they are (not encrypted) in the backing tree.
    assert os.readlink(mounted.store.backing / "rel") == "dir/target.txt"
    assert os.readlink(mounted.store.backing / "abs") == absolute
    for link in ("rel", "abs", "dir/up"):
        st = os.lstat(mnt / link)
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_size == len(os.readlink(mnt / link))
        assert (mnt / link).read_bytes() == b"through the link"
        assert os.stat(mnt / link).st_ino == os.stat(mnt / "dir" / "target.txt").st_ino
    assert not (mnt / "dangling").exists()
    assert os.path.lexists(mnt / "dangling")
    assert sorted(os.listdir(mnt / "dirlink")) == ["target.txt", "up"]
    # Writing through a symlink writes the target.
    with open(mnt / "rel", "ab") as fh:
        fh.write(b"!")
    assert (mnt / "dir" / "target.txt").read_bytes() == b"through the link!"
    os.unlink(mnt / "rel")
    assert (mnt / "dir" / "target.txt").exists()
    assert oserror(os.symlink, "x", mnt / "abs") == errno.EEXIST


def test_symlink_survives_remount(store):
    m = store.mount()
    os.symlink("some/target", m.path / "l")
    m.unmount()
    m2 = store.mount()
    assert os.readlink(m2.path / "l") == "some/target"


def test_hard_links(mounted):
    mnt = mounted.path
    a = mnt / "a"
    data = random.Random(3).randbytes(2 * B + 77)
    a.write_bytes(data)
    (mnt / "sub").mkdir()
    b = mnt / "sub" / "b"
    os.link(a, b)
    sa, sb = a.stat(), b.stat()
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    assert (mounted.store.backing / "a").stat().st_ino == (mounted.store.backing / "sub" / "b").stat().st_ino
    assert b.read_bytes() == data
    # Write via one name, read via the other (both while open and afterwards).
    with open(a, "r+b", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        fa.seek(B - 2)
        fa.write(b"LINKED")
        fb.seek(B - 2)
        assert fb.read(6) == b"LINKED"
    expected = bytearray(data)
    expected[B - 2:B + 4] = b"LINKED"
    assert b.read_bytes() == bytes(expected)
    with open(b, "ab") as fh:
        fh.write(b"tail")
    expected += b"tail"
    assert a.read_bytes() == bytes(expected)
    assert a.stat().st_size == len(expected)
    # Truncate via one.
    os.truncate(b, 100)
    assert a.read_bytes() == bytes(expected[:100])
    # Unlink one: the other keeps the content, nlink drops to 1.
    os.unlink(a)
    assert not a.exists()
    assert b.stat().st_nlink == 1
    assert b.read_bytes() == bytes(expected[:100])
    # A third link, then a remount: still one inode.
    c = mnt / "c"
    os.link(b, c)
    assert c.stat().st_nlink == 2
    mounted.unmount()
    m2 = mounted.store.mount()
    assert (m2.path / "c").read_bytes() == bytes(expected[:100])
    assert (m2.path / "c").stat().st_ino == (m2.path / "sub" / "b").stat().st_ino
    assert (m2.path / "c").stat().st_nlink == 2
    assert oserror(os.link, m2.path / "sub", m2.path / "dirlink") == errno.EPERM


# ============================================================================ renames


def test_rename_plain_over_existing_across_dirs_and_dirs(mounted):
    mnt = mounted.path
    (mnt / "a").write_bytes(b"A" * (B + 1))
    os.rename(mnt / "a", mnt / "b")
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A" * (B + 1)
    # Over an existing file: the target's old content is gone.
    (mnt / "c").write_bytes(b"C" * 10)
    ino_b = (mnt / "b").stat().st_ino
    os.rename(mnt / "b", mnt / "c")
    assert (mnt / "c").read_bytes() == b"A" * (B + 1)
    assert (mnt / "c").stat().st_ino == ino_b
    assert names(mnt) == ["c"]
    # Across directories.
    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    os.rename(mnt / "c", mnt / "d1" / "x")
    os.rename(mnt / "d1" / "x", mnt / "d2" / "y")
    assert (mnt / "d2" / "y").read_bytes() == b"A" * (B + 1)
    assert os.listdir(mnt / "d1") == []
    assert os.listdir(mounted.store.backing / "d2") == ["y"]
    # Directories: plain, into another, over an empty one; not over a non-empty one.
    (mnt / "d2" / "inner").mkdir()
    (mnt / "d2" / "inner" / "f").write_bytes(b"deep")
    os.rename(mnt / "d2", mnt / "d3")
    assert (mnt / "d3" / "inner" / "f").read_bytes() == b"deep"
    os.rename(mnt / "d3", mnt / "d1" / "d3")
    assert (mnt / "d1" / "d3" / "y").read_bytes() == b"A" * (B + 1)
    (mnt / "empty").mkdir()
    os.rename(mnt / "d1" / "d3" / "inner", mnt / "empty")
    assert (mnt / "empty" / "f").read_bytes() == b"deep"
    (mnt / "full").mkdir()
    (mnt / "full" / "g").write_bytes(b"g")
    assert oserror(os.rename, mnt / "empty", mnt / "full") in (errno.ENOTEMPTY, errno.EEXIST)
    assert oserror(os.rename, mnt / "empty", mnt / "full" / "g") == errno.ENOTDIR
    assert oserror(os.rename, mnt / "full" / "g", mnt / "empty") == errno.EISDIR
    assert oserror(os.rename, mnt / "d1", mnt / "d1" / "d3" / "into-itself") == errno.EINVAL
    assert oserror(os.rename, mnt / "missing", mnt / "x") == errno.ENOENT
    # Renaming a file keeps an open handle working (the handle follows the inode).
    with open(mnt / "full" / "g", "r+b", buffering=0) as fh:
        os.rename(mnt / "full" / "g", mnt / "moved-g")
        fh.seek(0, os.SEEK_END)
        fh.write(b"-after")
    assert (mnt / "moved-g").read_bytes() == b"g-after"
    assert names(mnt) == sorted(n for n in os.listdir(mounted.store.backing) if n != ".kmsfs.d")


def test_rename_noreplace_and_exchange(mounted):
    mnt = mounted.path
    a, b = mnt / "a", mnt / "b"
    a.write_bytes(b"content of a" * 500)
    b.write_bytes(b"content of b")
    with pytest.raises(OSError) as info:
        renameat2(a, b, RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    assert a.read_bytes() == b"content of a" * 500
    assert b.read_bytes() == b"content of b"
    renameat2(a, mnt / "c", RENAME_NOREPLACE)
    assert not a.exists()
    assert (mnt / "c").read_bytes() == b"content of a" * 500
    # Exchange two files, then a file with a directory in another directory.
    renameat2(mnt / "c", b, RENAME_EXCHANGE)
    assert b.read_bytes() == b"content of a" * 500
    assert (mnt / "c").read_bytes() == b"content of b"
    assert (mounted.store.backing / "c").stat().st_size == ciphertext_size(len(b"content of b"), B)
    (mnt / "d").mkdir()
    (mnt / "d" / "e").mkdir()
    (mnt / "d" / "e" / "inside").write_bytes(b"in e")
    renameat2(mnt / "c", mnt / "d" / "e", RENAME_EXCHANGE)
    assert (mnt / "c" / "inside").read_bytes() == b"in e"
    assert (mnt / "d" / "e").read_bytes() == b"content of b"
    with pytest.raises(OSError) as info:
        renameat2(mnt / "missing", b, RENAME_EXCHANGE)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        renameat2(b, mnt / ".kmsfs.d", RENAME_EXCHANGE)
    assert info.value.errno in (errno.EPERM, errno.ENOENT)
    assert (mounted.store.backing / ".kmsfs.d" / "config.json").is_file()
    # Still right after a remount (the backing tree really changed).
    mounted.unmount()
    m2 = mounted.store.mount()
    assert (m2.path / "b").read_bytes() == b"content of a" * 500
    assert (m2.path / "c" / "inside").read_bytes() == b"in e"


# ============================================================================ special files


def test_fifo_works_as_a_fifo(mounted):
    fifo = mounted.path / "pipe"
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert stat.S_ISFIFO((mounted.store.backing / "pipe").stat().st_mode)
    payload = b"through the fifo\n" * 10000  # more than a pipe buffer holds
    errors: list[OSError] = []
    # The read end first, without blocking, so that nothing can hang.
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def writer() -> None:
        try:
            with open(fifo, "wb") as fh:
                fh.write(payload)
        except OSError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    got = bytearray()
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([rfd], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(rfd, 65536)
            if not chunk and not thread.is_alive():
                break  # EOF: the writer closed its end
            got += chunk
    finally:
        os.close(rfd)
    thread.join(10)
    assert not thread.is_alive()
    assert not errors
    assert bytes(got) == payload
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert fifo.stat().st_size == 0
    os.unlink(fifo)
    assert not os.path.lexists(mounted.store.backing / "pipe")


def test_mknod_regular_file_and_socket(mounted):
    os.mknod(mounted.path / "reg", stat.S_IFREG | 0o600)
    assert stat.S_ISREG((mounted.path / "reg").stat().st_mode)
    # A regular file made by mknod gets a header like any other file.
    assert raw_header(mounted.store.backing / "reg")[:4] == b"KMSF"
    (mounted.path / "reg").write_bytes(b"mknod file")
    assert (mounted.path / "reg").read_bytes() == b"mknod file"
    # A unix socket bound in the mount is a socket in the backing tree.
    path = str(mounted.path / "sock")
    if len(path) >= 100:
        pytest.skip("the mount path is too long for a unix socket address")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_ISSOCK((mounted.store.backing / "sock").lstat().st_mode)
    finally:
        server.close()
    os.unlink(path)


def test_statfs_is_sane(mounted):
    sv = os.statvfs(mounted.path)
    backing = os.statvfs(mounted.store.backing)
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert 0 <= sv.f_bfree <= sv.f_blocks
    assert 0 <= sv.f_bavail <= sv.f_blocks
    assert sv.f_files >= sv.f_ffree >= 0
    assert sv.f_namemax == backing.f_namemax == 255
    assert sv.f_blocks * sv.f_frsize == backing.f_blocks * backing.f_frsize
    total, _, free = shutil.disk_usage(mounted.path)
    assert total > 0 and 0 <= free <= total


def test_fsync_and_fdatasync(mounted):
    path = mounted.path / "sync"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"x" * (B + 3))
        os.fsync(fd)
        os.write(fd, b"y")
        os.fdatasync(fd)
        assert os.pread(fd, B + 4, 0) == b"x" * (B + 3) + b"y"
    finally:
        os.close(fd)
    # fsync on a read-only handle and on a directory handle.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(mounted.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (mounted.store.backing / "sync").stat().st_size == ciphertext_size(B + 4, B)


# ============================================================================ xattrs


def test_user_xattrs_pass_through(mounted):
    path = mounted.path / "x"
    path.write_bytes(b"content")
    backing = mounted.store.backing / "x"
    os.setxattr(path, "user.color", b"blue")
    os.setxattr(path, "user.empty", b"")
    os.setxattr(path, "user.binary", bytes(range(256)))
    assert os.getxattr(path, "user.color") == b"blue"
    assert os.getxattr(backing, "user.color") == b"blue"
    assert os.getxattr(backing, "user.binary") == bytes(range(256))
    assert os.getxattr(path, "user.empty") == b""
    assert {"user.color", "user.empty", "user.binary"} <= set(os.listxattr(path))
    with pytest.raises(OSError) as info:
        os.setxattr(path, "user.color", b"red", os.XATTR_CREATE)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(OSError) as info:
        os.setxattr(path, "user.nothere", b"v", os.XATTR_REPLACE)
    assert info.value.errno == errno.ENODATA
    os.setxattr(path, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(backing, "user.color") == b"red"
    os.removexattr(path, "user.color")
    assert "user.color" not in os.listxattr(path)
    assert "user.color" not in os.listxattr(backing)
    assert oserror(os.getxattr, path, "user.color") == errno.ENODATA
    assert oserror(os.removexattr, path, "user.color") == errno.ENODATA
    # Directories too.
    d = mounted.path / "d"
    d.mkdir()
    os.setxattr(d, "user.tag", b"dirtag")
    assert os.getxattr(mounted.store.backing / "d", "user.tag") == b"dirtag"
    assert os.getxattr(d, "user.tag") == b"dirtag"
    assert "user.tag" in os.listxattr(d)
    # Content is unaffected.
    assert path.read_bytes() == b"content"


NON_USER_XATTRS = ("security.selinux", "security.capability", "system.posix_acl_access",
                   "system.posix_acl_default", "trusted.note")


@pytest.mark.parametrize("name", NON_USER_XATTRS)
def test_only_the_user_xattr_namespace_exists_on_a_mount(mounted, name):
    # Such xattrs of the backing file would describe the ciphertext file (its
    # SELinux label, ACLs the mount does not enforce, file capabilities): a
    # mount neither shows nor sets them, and the backing file keeps its own.
    path = mounted.path / "ns"
    path.write_bytes(b"content")
    d = mounted.path / "nsdir"
    d.mkdir()
    backing = mounted.store.backing / "ns"
    # A valid ACL (user::rw-, group::r--, other::r--) for the system.posix_acl_* names.
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                           for tag, perm in ((0x01, 6), (0x04, 4), (0x20, 4)))
    value = acl if name.startswith("system.") else b"v"
    for target in (path, d, mounted.path):
        assert oserror(os.getxattr, target, name) in (errno.ENODATA, errno.EOPNOTSUPP)
        # (The kernel checks some values itself: it refuses a default ACL on a
        # file with EACCES, a malformed capability with EINVAL.)
        assert oserror(os.setxattr, target, name, value) in (errno.EOPNOTSUPP, errno.EACCES, errno.EINVAL)
        if not (name == "system.posix_acl_default" and target == path):  # the kernel says yes to that one
            assert oserror(os.removexattr, target, name) in (errno.EOPNOTSUPP, errno.ENODATA)
    # A trusted.* xattr that the backing file carries stays there, unseen.
    if os.geteuid() == 0 and name == "trusted.note":
        os.setxattr(backing, name, b"backing only")
        assert oserror(os.getxattr, path, name) == errno.ENODATA
        assert name not in os.listxattr(path)
        assert oserror(os.setxattr, path, name, b"new") == errno.EOPNOTSUPP
        assert oserror(os.removexattr, path, name) == errno.EOPNOTSUPP
        assert os.getxattr(backing, name) == b"backing only"
    assert all(n.startswith("user.") for n in os.listxattr(path))
    # Writes (the kernel asks for security.capability before each) still work.
    with open(path, "r+b") as fh:
        fh.write(b"CONTENT")
    assert path.read_bytes() == b"CONTENT"
    assert "ERROR" not in mounted.log()


def test_header_xattr_is_hidden_and_protected(mounted):
    path = mounted.path / "h"
    path.write_bytes(b"secret" * 1000)
    backing = mounted.store.backing / "h"
    header = raw_header(backing)
    parse_header(header)
    assert "user.kmsfs" not in os.listxattr(path)
    assert oserror(os.getxattr, path, "user.kmsfs") == errno.ENODATA
    assert oserror(os.getxattr, path, "user.kmsfs.probe") == errno.ENODATA
    assert oserror(os.setxattr, path, "user.kmsfs", b"KMSF garbage") == errno.EPERM
    assert oserror(os.setxattr, path, "user.kmsfs", header) == errno.EPERM
    assert oserror(os.removexattr, path, "user.kmsfs") == errno.EPERM
    assert oserror(os.setxattr, path, "user.kmsfs.other", b"x") == errno.EPERM
    assert oserror(os.setxattr, path, "user.kmsfs.context", b'{"a":"b"}') == errno.EPERM
    assert oserror(os.removexattr, path, "user.kmsfs.key") == errno.EPERM
    assert oserror(os.removexattr, path, "user.kmsfs.context") == errno.EPERM
    assert raw_header(backing) == header
    assert path.read_bytes() == b"secret" * 1000
    # Hidden on directories and the root too (the root holds no header, but the names stay reserved).
    assert oserror(os.setxattr, mounted.path, "user.kmsfs", b"x") == errno.EPERM
    assert "user.kmsfs" not in os.listxattr(mounted.path)


def test_key_xattr_on_files_is_json(mounted):
    path = mounted.path / "k"
    path.write_bytes(b"k")
    info = json.loads(os.getxattr(path, "user.kmsfs.key"))
    assert set(info) >= {"KeyId", "Alias", "KeyVersion"}
    assert info["Alias"] == "kmsfs-default"
    assert info["KeyVersion"] == 1
    key_id = uuid.UUID(info["KeyId"])
    assert key_id.bytes == parse_header(raw_header(mounted.store.backing / "k")).key_id
    assert str(key_id) in mounted.store.init_output
    assert "user.kmsfs.key" in os.listxattr(path)
    assert "user.kmsfs.context" not in os.listxattr(path)
    assert oserror(os.getxattr, path, "user.kmsfs.context") == errno.ENODATA
    # An empty file created through the mount has a header too.
    (mounted.path / "empty").touch()
    assert json.loads(os.getxattr(mounted.path / "empty", "user.kmsfs.key"))["KeyId"] == str(key_id)
    # Rewrapping to the same key by alias keeps the content readable.
    before = raw_header(mounted.store.backing / "k")
    os.setxattr(path, "user.kmsfs.key", b"kmsfs-default")
    after = raw_header(mounted.store.backing / "k")
    assert parse_header(after).file_id == parse_header(before).file_id
    assert path.read_bytes() == b"k"
    assert oserror(os.setxattr, path, "user.kmsfs.key", b"no-such-key") == errno.EINVAL
    assert raw_header(mounted.store.backing / "k") == after


def test_key_xattr_on_directories(mounted):
    d = mounted.path / "d"
    d.mkdir()
    os.setxattr(d, "user.kmsfs.key", b"kmsfs-default")
    stored = os.getxattr(mounted.store.backing / "d", "user.kmsfs.key").decode()
    uuid.UUID(stored)  # stored as the KeyId
    assert os.getxattr(d, "user.kmsfs.key").decode() == stored
    assert "user.kmsfs.key" in os.listxattr(d)
    assert oserror(os.setxattr, d, "user.kmsfs.key", b"no-such-alias") == errno.EINVAL
    assert oserror(os.setxattr, d, "user.kmsfs.key", b"\xff\xfe") == errno.EINVAL
    assert oserror(os.setxattr, d, "user.kmsfs.key", str(uuid.uuid4()).encode()) == errno.EINVAL
    assert os.getxattr(mounted.store.backing / "d", "user.kmsfs.key").decode() == stored
    (d / "f").write_bytes(b"under a keyed dir")
    assert json.loads(os.getxattr(d / "f", "user.kmsfs.key"))["KeyId"] == stored
    assert (d / "f").read_bytes() == b"under a keyed dir"
    os.removexattr(d, "user.kmsfs.key")
    assert oserror(os.getxattr, d, "user.kmsfs.key") == errno.ENODATA


def test_context_xattr_on_directories_and_inheritance(mounted):
    d = mounted.path / "ctx"
    d.mkdir()
    os.setxattr(d, "user.kmsfs.context", b'{ "team": "blue", "app": "db" }')
    canonical = b'{"app":"db","team":"blue"}'
    assert os.getxattr(d, "user.kmsfs.context") == canonical
    assert os.getxattr(mounted.store.backing / "ctx", "user.kmsfs.context") == canonical
    bad_values = [
        b"not json", b"{", b'["a", "b"]', b'"string"', b"42", b"null",
        b'{"a": 1}', b'{"a": null}', b'{"a": ["b"]}', b'{"a": {"b": "c"}}',
        ('{"k": "' + "v" * 1100 + '"}').encode(), b"\xff\xfe",
    ]
    for value in bad_values:
        assert oserror(os.setxattr, d, "user.kmsfs.context", value) == errno.EINVAL, value
    assert os.getxattr(d, "user.kmsfs.context") == canonical
    # Exactly 1024 characters is still accepted.
    limit = '{"k":"' + "v" * (1024 - 8) + '"}'
    assert len(limit) == 1024
    e = mounted.path / "limit"
    e.mkdir()
    os.setxattr(e, "user.kmsfs.context", limit.encode())
    (e / "f").write_bytes(b"1024")
    assert os.getxattr(e / "f", "user.kmsfs.context") == limit.encode()
    # Files directly below and further down inherit the context.
    (d / "file").write_bytes(b"inherits")
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "deeper" / "file").write_bytes(b"inherits too")
    for f in (d / "file", d / "sub" / "deeper" / "file"):
        assert os.getxattr(f, "user.kmsfs.context") == canonical
        assert "user.kmsfs.context" in os.listxattr(f)
        assert parse_header(raw_header(mounted.store.backing / f.relative_to(mounted.path))).context == canonical
    assert (d / "sub" / "deeper" / "file").read_bytes() == b"inherits too"
    # A nearer directory's context wins.
    os.setxattr(d / "sub", "user.kmsfs.context", b'{"team":"red"}')
    (d / "sub" / "deeper" / "other").write_bytes(b"x")
    assert os.getxattr(d / "sub" / "deeper" / "other", "user.kmsfs.context") == b'{"team":"red"}'
    # The context of an existing file cannot be set or removed.
    f = d / "file"
    header = raw_header(mounted.store.backing / "ctx" / "file")
    assert oserror(os.setxattr, f, "user.kmsfs.context", b'{"a":"b"}') == errno.EPERM
    assert oserror(os.removexattr, f, "user.kmsfs.context") == errno.EPERM
    assert raw_header(mounted.store.backing / "ctx" / "file") == header
    # Files outside the directory have no context; contents survive a remount.
    (mounted.path / "outside").write_bytes(b"o")
    assert oserror(os.getxattr, mounted.path / "outside", "user.kmsfs.context") == errno.ENODATA
    mounted.unmount()
    m2 = mounted.store.mount()
    assert os.getxattr(m2.path / "ctx" / "file", "user.kmsfs.context") == canonical
    assert (m2.path / "ctx" / "sub" / "deeper" / "file").read_bytes() == b"inherits too"


def test_empty_context_on_directory_stops_inheritance(mounted):
    d = mounted.path / "outer"
    d.mkdir()
    os.setxattr(d, "user.kmsfs.context", b'{"a":"b"}')
    inner = d / "inner"
    inner.mkdir()
    os.setxattr(inner, "user.kmsfs.context", b"{}")
    (inner / "f").write_bytes(b"no context here")
    assert (inner / "f").read_bytes() == b"no context here"
    assert oserror(os.getxattr, inner / "f", "user.kmsfs.context") == errno.ENODATA
    (d / "g").write_bytes(b"ctx")
    assert os.getxattr(d / "g", "user.kmsfs.context") == b'{"a":"b"}'
