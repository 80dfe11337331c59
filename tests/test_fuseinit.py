"""kmsfs/fuseinit.py's lookups, each of which must say "not here" rather than guess.

A libfuse that answers INIT with nothing, or fails, is tried on real mounts
at the end.  That INIT is answered with the flags, and what the file system
then owes the kernel, is checked on real mounts: tests/test_perf_paths.py
(the flags, and -o libfuse_init) and tests/test_hostile.py (set-id bits on
write, truncate and open with O_TRUNC, against ext4).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import subprocess
import sys

import pyfuse3
import pytest

from conftest import is_mounted
from kmsfs import fuseinit


def test_pyfuse3s_session_symbols_are_found_in_its_module():
    symbols = fuseinit._elf_symbols(pyfuse3.__file__, {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session",
                                                       "__pyx_v_7pyfuse3_session_fd", "no_such_symbol"})
    assert set(symbols) == {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_session_fd"}
    assert len(set(symbols.values())) == 3


def test_a_file_that_is_not_elf_has_no_symbols(tmp_path):
    path = tmp_path / "not-elf.so"
    path.write_bytes(b"#!/bin/sh\n" * 100)
    assert fuseinit._elf_symbols(str(path), {"PyInit_pyfuse3"}) == {}
    big_endian = bytearray(b"\x7fELF\x02\x02" + bytes(58))
    path.write_bytes(big_endian)
    assert fuseinit._elf_symbols(str(path), {"PyInit_pyfuse3"}) == {}


def test_without_a_symbol_table_nothing_is_touched(monkeypatch, caplog):
    monkeypatch.setattr(fuseinit, "_elf_symbols", lambda path, wanted: {})
    caplog.set_level(logging.WARNING, logger="kmsfs.fuseinit")
    assert fuseinit._pyfuse3_session() is None
    assert fuseinit.answer_init() is None  # and no INIT was read: nothing is mounted here
    assert "no symbol table" in caplog.text and fuseinit.LEFT_TO_LIBFUSE in caplog.text


def test_a_mount_gone_before_init_is_not_an_error(monkeypatch):
    """fusermount -u right after the mount appears: the kernel drops the
    connection, reading INIT fails with ENODEV, and pyfuse3's loop ends the
    session as it would have without kmsfs/fuseinit.py."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")

    def gone(fd: int, size: int) -> bytes:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(fuseinit.os, "read", gone)
    try:
        assert fuseinit._read_init(read_end) is None
    finally:
        os.close(read_end)
        os.close(write_end)


def _session_like(*ints: int) -> ctypes.Array:
    return (ctypes.c_int * 16)(*ints)


def test_the_session_descriptor_is_found_by_its_value_alone(caplog):
    # libfuse 3.14: char *mountpoint; volatile int exited; int fd; ...
    session = _session_like(0x5678, 0x7F00, 0, 7, 0x1234, 0x7F00, 1, 0)
    field = fuseinit._session_fd_field(ctypes.addressof(session), 7)
    assert field is not None and field.value == 7
    field.value = 9
    assert session[3] == 9
    # Twice, or not at all: no guess.
    caplog.set_level(logging.WARNING, logger="kmsfs.fuseinit")
    assert fuseinit._session_fd_field(ctypes.addressof(_session_like(0, 0, 0, 7, 7)), 7) is None
    assert fuseinit._session_fd_field(ctypes.addressof(_session_like(0, 0, 0, 8)), 7) is None
    assert "descriptor not found (2 candidates)" in caplog.text


def test_init_reply_flags_sit_where_the_protocol_puts_them():
    # struct fuse_out_header, then fuse_init_out's major, minor, max_readahead and flags.
    reply = struct.pack("<IiQIIII", 80, 0, 2, 7, 31, 0x20000, 0x4040B039)
    assert struct.unpack_from("<I", reply, fuseinit._INIT_OUT_FLAGS)[0] == 0x4040B039
    negotiated = fuseinit.Negotiated((0x4040B039 | fuseinit.FUSE_HANDLE_KILLPRIV_V2) & ~fuseinit.FUSE_AUTO_INVAL_DATA)
    assert negotiated.handle_killpriv_v2 and not negotiated.auto_inval_data


# ====================================================================== a libfuse that misbehaves, on a real mount

#: Runs ``kmsfs mount -f`` with libfuse's fuse_session_process_buf replaced, for
#: INIT only (answer_init is its one caller through ctypes), by MODE:
#: "silent" (libfuse writes no reply) or "raises" (the call fails).
MISBEHAVING_LIBFUSE = """
import ctypes, sys
from kmsfs.cli import main

mode = sys.argv[1]
real_pydll = ctypes.PyDLL

def process_buf(se, buf):
    if mode == "raises":
        raise RuntimeError("libfuse broke down")

class Libfuse:
    def __init__(self, name):
        self.real = real_pydll(name)
        self.fuse_session_process_buf = process_buf  # a function: takes argtypes, as ctypes' does

    def __getattr__(self, name):
        return getattr(self.real, name)

ctypes.PyDLL = Libfuse
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.mount
@pytest.mark.parametrize("mode, cause", [
    ("silent", "libfuse gave no INIT reply"),
    ("raises", "libfuse broke down"),
])
def test_a_failed_init_ends_the_mount_with_a_clear_message(store, mode, cause):
    """Where INIT cannot be answered (the kernel gets EPROTO when libfuse said
    nothing), the daemon says why in its log and on stderr, exits with status
    1, and leaves nothing mounted; the store mounts normally afterwards."""
    mountpoint = store.root / f"mnt-{mode}"
    mountpoint.mkdir()
    log_file = store.root / f"{mode}.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", MISBEHAVING_LIBFUSE, mode, "mount", "-f", "--log-file", str(log_file),
         str(store.backing), str(mountpoint)],
        env=store.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    log = log_file.read_text()
    assert proc.returncode == 1, log
    assert not is_mounted(mountpoint)
    assert f"FUSE INIT on {mountpoint} failed: " in log and cause in log
    assert err.decode() == f"kmsfs mount: refused; see the log in {log_file}\n"
    if mode == "silent":
        assert "refusing the connection" in log
    # The store is untouched: a normal mount serves it.
    mount = store.mount()
    (mount.path / "after").write_bytes(b"fine")
    assert (mount.path / "after").read_bytes() == b"fine"
