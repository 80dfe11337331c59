"""Answering FUSE's INIT with two capabilities that pyfuse3 cannot ask for.

The kernel offers them; libfuse 3.14 and pyfuse3 3.5 give a file system no
way to take the first or to decline the second:

- ``FUSE_HANDLE_KILLPRIV_V2``: the file system drops set-user-ID and
  set-group-ID bits itself on write, truncate and chown.  Without it the
  kernel asks for the ``security.capability`` xattr before every write(2)
  (a GETXATTR request) to find out whether it must drop privileges.  With
  it the kernel marks an inode as checked after its first write
  (``S_NOSEC``), until its attributes are next refreshed.
- ``FUSE_AUTO_INVAL_DATA`` (libfuse turns it on by default): the kernel
  refreshes a file's attributes before every read after a write (a
  GETATTR request) and drops all its cached pages whenever it sees a new
  mtime, which our own writes make.  kmsfs promises changes made behind the
  mount's back from the next open on (fs.KmsfsOperations.open compares the
  backing file with what it last served), drops cached pages itself when
  a key is disabled, and the kernel still drops pages past a size it learns
  has shrunk.  Nothing relies on it.

fio 4 KiB random read/write (the bench's workload), 3 alternating rounds of
15 s: 5.8k-6.7k read IOPS with libfuse's flags, 8.7k-9.1k with these; the
requests per operation fall from 1.75 to 1 (one GETXATTR per write and a
GETATTR after every other read are gone).

How: ``pyfuse3.init`` has created libfuse's session and mounted, and the
kernel has queued INIT.  Before pyfuse3's loop starts, :func:`answer_init`
reads INIT itself and hands it to libfuse (``fuse_session_process_buf``),
with libfuse's descriptor pointed for that one call at a socket, so that
libfuse's reply comes back here.  Only the reply's flags are changed, then
it goes to /dev/fuse.  libfuse's own state is that of any INIT.  This needs
two private things: pyfuse3's session pointer and descriptor (C globals of
its extension module, found in the module's symbol table: pip builds it from
source, unstripped), and where libfuse keeps the descriptor in its session
(found by value).  If either is not as expected, nothing is read and pyfuse3
answers INIT as usual, with libfuse's flags (logged).

What the file system then owes the kernel (fs.py): dropping set-id bits on
write (fs.KmsfsOperations._drop_set_id_bits, for every writer that is not
root), on truncate and on an open with O_TRUNC.  A chown of the backing file
drops them on ext4 by itself.  pyfuse3 does not pass on the kernel's flags
that say "this caller has no CAP_FSETID", so an opener or caller other than
root is taken to have none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass

import pyfuse3

log = logging.getLogger(__name__)

FUSE_INIT = 26
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28

_IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
_INIT_OUT_FLAGS = _OUT_HEADER.size + 12  # after major, minor, max_readahead

#: How long to wait for the kernel's INIT, which it queues while mounting.
INIT_WAIT_SECONDS = 10.0
#: Said whenever INIT is left to libfuse.
LEFT_TO_LIBFUSE = "FUSE INIT is answered with libfuse's flags"


@dataclass(frozen=True)
class Negotiated:
    """The flags of the INIT reply, as sent to the kernel."""

    flags: int

    @property
    def handle_killpriv_v2(self) -> bool:
        return bool(self.flags & FUSE_HANDLE_KILLPRIV_V2)

    @property
    def auto_inval_data(self) -> bool:
        return bool(self.flags & FUSE_AUTO_INVAL_DATA)


class _FuseBuf(ctypes.Structure):
    """libfuse's ``struct fuse_buf`` (fuse_common.h)."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_long)]


def _elf_symbols(path: str, wanted: set[str]) -> dict[str, int]:
    """Values of ``wanted`` in an ELF64 little-endian file's symbol table (.symtab)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, int] = {}
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 2 or not entsize:  # SHT_SYMTAB
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            name_at, _info8, _other, _shndx, value = struct.unpack_from("<IBBHQ", data, pos)
            if not name_at or not value:
                continue
            end = data.index(b"\0", strtab_offset + name_at)
            name = data[strtab_offset + name_at:end].decode("ascii", "replace")
            if name in wanted:
                found[name] = value
    return found


def _pyfuse3_session() -> tuple[int, int] | None:
    """(address of libfuse's session, /dev/fuse descriptor) from pyfuse3's globals."""
    path = pyfuse3.__file__
    assert path is not None
    anchor, session, session_fd = "PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_session_fd"
    symbols = _elf_symbols(path, {anchor, session, session_fd})
    if len(symbols) != 3:
        log.warning("pyfuse3's module has no symbol table with its session (stripped?); %s", LEFT_TO_LIBFUSE)
        return None
    module = ctypes.CDLL(path)
    base = ctypes.cast(getattr(module, anchor), ctypes.c_void_p).value
    assert base is not None
    base -= symbols[anchor]
    se = ctypes.c_void_p.from_address(base + symbols[session]).value
    fd = ctypes.c_int.from_address(base + symbols[session_fd]).value
    if not se or fd < 3 or os.readlink(f"/proc/self/fd/{fd}") != "/dev/fuse":
        log.warning("pyfuse3's session is not where expected; %s", LEFT_TO_LIBFUSE)
        return None
    return se, fd


def _session_fd_field(se: int, fd: int) -> ctypes.c_int | None:
    """libfuse's ``fd`` in its session (after the mountpoint pointer and ``exited``): found by value."""
    matches = [offset for offset in range(0, 64, 4) if ctypes.c_int.from_address(se + offset).value == fd]
    if len(matches) != 1:
        log.warning("libfuse's session descriptor not found (%d candidates); %s", len(matches), LEFT_TO_LIBFUSE)
        return None
    return ctypes.c_int.from_address(se + matches[0])


def _read_init(fd: int) -> bytes | None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(INIT_WAIT_SECONDS * 1000):
        log.warning("no INIT from the kernel within %.0f s; %s", INIT_WAIT_SECONDS, LEFT_TO_LIBFUSE)
        return None
    try:
        return os.read(fd, 1 << 20)
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            raise
        # Unmounted before INIT was read: pyfuse3's loop finds the session
        # ended, as it would have without us, and the daemon exits normally.
        log.info("the mount went away before FUSE INIT")
        return None


def answer_init(set_flags: int = FUSE_HANDLE_KILLPRIV_V2, clear_flags: int = FUSE_AUTO_INVAL_DATA) -> Negotiated | None:
    """Answer the kernel's INIT through libfuse, with the reply's flags changed.

    Call after ``pyfuse3.init`` and before ``pyfuse3.main``.  ``set_flags``
    are added only where the kernel offered them.  None: nothing was done,
    and pyfuse3 will answer INIT itself.
    """
    found = _pyfuse3_session()
    if found is None:
        return None
    se, fd = found
    fd_field = _session_fd_field(se, fd)
    if fd_field is None:
        return None
    libfuse = ctypes.PyDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")  # keeps the GIL
    process_buf = libfuse.fuse_session_process_buf
    process_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf)]
    process_buf.restype = None
    request = _read_init(fd)
    if request is None:
        return None
    # From here on the kernel waits for an answer and libfuse must see INIT:
    # whatever happens below, both do.
    buffer = ctypes.create_string_buffer(request, len(request))
    fuse_buf = _FuseBuf(size=len(request), flags=0, mem=ctypes.cast(buffer, ctypes.c_void_p), fd=-1, pos=0)
    _length, opcode, unique, *_ = _IN_HEADER.unpack_from(request)
    if opcode != FUSE_INIT or len(request) < _IN_HEADER.size + _INIT_IN.size:
        log.warning("the first request is opcode %d, not INIT; %s", opcode, LEFT_TO_LIBFUSE)
        process_buf(se, ctypes.byref(fuse_buf))
        return None
    offered = _INIT_IN.unpack_from(request, _IN_HEADER.size)[3]
    ours, libfuses = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, libfuses:
        fd_field.value = libfuses.fileno()
        try:
            process_buf(se, ctypes.byref(fuse_buf))
        finally:
            fd_field.value = fd
        ours.setblocking(False)
        try:
            reply = bytearray(ours.recv(1 << 16))
        except BlockingIOError:
            reply = bytearray()
    if len(reply) < _OUT_HEADER.size or _OUT_HEADER.unpack_from(reply)[2] != unique:
        # libfuse wrote nothing we can use: the kernel still waits.  Tell it so.
        log.error("libfuse gave no INIT reply; refusing the connection")
        os.write(fd, _OUT_HEADER.pack(_OUT_HEADER.size, -errno.EPROTO, unique))
        raise OSError(errno.EPROTO, "libfuse gave no INIT reply")
    error = _OUT_HEADER.unpack_from(reply)[1]
    if error or len(reply) < _INIT_OUT_FLAGS + 4:
        # A refusal, or only a version offer (a kernel with a newer major
        # version): the kernel gets it as it is, and a new INIT, if any, goes
        # to pyfuse3's loop.
        os.write(fd, reply)
        log.warning("libfuse answered INIT with error %d (%d bytes); flags left as they are", error, len(reply))
        return None
    flags = (struct.unpack_from("<I", reply, _INIT_OUT_FLAGS)[0] | (set_flags & offered)) & ~clear_flags
    struct.pack_into("<I", reply, _INIT_OUT_FLAGS, flags)
    os.write(fd, reply)
    negotiated = Negotiated(flags)
    log.info("FUSE INIT answered with flags %#x: handle_killpriv_v2 %s, auto_inval_data %s",
             flags, negotiated.handle_killpriv_v2, negotiated.auto_inval_data)
    return negotiated
