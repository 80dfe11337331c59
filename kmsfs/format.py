"""The kmsfs on-disk format, versions 1 and 2: pure data layout, no I/O.

This module is the single source of truth for the byte layout described in
``docs/format.md``.  Everything here is deterministic and side-effect free so
that golden test vectors can pin it.

File header (xattr ``user.kmsfs`` on every regular backing file), big-endian::

    offset  size  field
    0       4     magic            b"KMSF"
    4       1     version          2 (1 is still read and written, see below)
    5       1     flags            0 (reserved; non-zero is refused)
    6       1     block_size_log2  12..20: the block geometry, see below
    7       1     reserved         0
    8       16    file_id          random, os.urandom(16)
    24      16    key_id           CMK id (UUID bytes)
    40      4     key_version      CMK version, >= 1
    44      2     context_len      length L of the encryption context, <= 4096
    46      L     context          canonical JSON (UTF-8), empty when none
    46+L    12    wrap_nonce       random AES-GCM nonce used by the HSM
    58+L    48    wrapped_dek      AES-256-GCM(CMK, DEK) = 32 bytes ciphertext + 16 bytes tag

The associated data of the DEK wrap is the header prefix ``[0, 46+L)``: every
field before the nonce, context included, so no field can be changed without
the HSM refusing to unwrap.

Content: the backing file is a sequence of blocks.  Each plaintext block of
``block_size`` bytes (the last one may be shorter, never empty) is stored as::

    nonce (12, random) || AES-256-GCM ciphertext (same length) || tag (16)

with associated data ``file_id (16) || block_number (8, big-endian)``.  The
plaintext size therefore follows from the ciphertext size alone.  A block that
is entirely zero bytes on disk and has the full ciphertext length is a hole
(sparse region) and reads as zeros; see docs/threat-model.md.

The two versions differ only in what ``block_size_log2`` measures:

* version 2: the *ciphertext* block is ``2**log2`` bytes, so the plaintext
  block is ``2**log2 - 28`` (4068 for the default 4096).  With 4 KiB blocks
  every ciphertext block is exactly one page at a page-aligned offset, and
  Linux copies a write into the page cache page by page, checking for a fatal
  signal only between pages: a kill -9 of the daemon can therefore stop a
  write only at a block boundary, never inside a block.
* version 1: the *plaintext* block is ``2**log2`` bytes (ciphertext 4124 for
  4096), so blocks straddle pages and a kill -9 inside a write can tear one.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

#: The extended attribute of every regular backing file that holds its header.
HEADER_XATTR = "user.kmsfs"
MAGIC = b"KMSF"
#: The version of new stores (and so of their files).
FORMAT_VERSION = 2
#: Versions this code reads and writes.  Anything else is refused, never guessed at.
SUPPORTED_VERSIONS = frozenset({1, 2})

NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE
DEK_SIZE = 32
WRAPPED_DEK_SIZE = DEK_SIZE + TAG_SIZE
FILE_ID_SIZE = 16
KEY_ID_SIZE = 16

MIN_BLOCK_SIZE_LOG2 = 12
MAX_BLOCK_SIZE_LOG2 = 20
#: The on-disk (ciphertext) block size of new stores: one page.
DEFAULT_DISK_BLOCK_SIZE = 4096

#: The encryption context is given by users as JSON of at most this many characters.
MAX_CONTEXT_CHARS = 1024
#: Its canonical UTF-8 form can therefore not exceed 4 bytes per character.
MAX_CONTEXT_BYTES = 4 * MAX_CONTEXT_CHARS

_FIXED = struct.Struct(">4sBBBB16s16sIH")  # everything up to and including context_len
HEADER_MIN_SIZE = _FIXED.size + NONCE_SIZE + WRAPPED_DEK_SIZE

_BLOCK_NUMBER = struct.Struct(">Q")


class FormatError(ValueError):
    """Bytes that are not a valid kmsfs structure (corrupt, truncated, or foreign)."""


class UnsupportedVersion(FormatError):
    """A structure of a format version this code does not read."""


def block_size_from_log2(log2: int, version: int = FORMAT_VERSION) -> int:
    """The plaintext block size that ``block_size_log2`` stands for in ``version``."""
    if not MIN_BLOCK_SIZE_LOG2 <= log2 <= MAX_BLOCK_SIZE_LOG2:
        raise FormatError(f"block size 2**{log2} out of range")
    return (1 << log2) - (BLOCK_OVERHEAD if version >= 2 else 0)


def block_size_log2(block_size: int, version: int = FORMAT_VERSION) -> int:
    """The ``block_size_log2`` field for plaintext blocks of ``block_size`` bytes."""
    nominal = block_size + (BLOCK_OVERHEAD if version >= 2 else 0)
    log2 = nominal.bit_length() - 1
    if block_size <= 0 or nominal != 1 << log2 or not MIN_BLOCK_SIZE_LOG2 <= log2 <= MAX_BLOCK_SIZE_LOG2:
        if version >= 2:
            raise FormatError(
                f"block size {block_size} + {BLOCK_OVERHEAD} must be a power of two from "
                f"{1 << MIN_BLOCK_SIZE_LOG2} to {1 << MAX_BLOCK_SIZE_LOG2}"
            )
        raise FormatError(
            f"block size {block_size} must be a power of two from "
            f"{1 << MIN_BLOCK_SIZE_LOG2} to {1 << MAX_BLOCK_SIZE_LOG2}"
        )
    return log2


def disk_block_size(block_size: int, version: int = FORMAT_VERSION) -> int:
    """The power of two that names a store's geometry (its I/O size hint)."""
    return 1 << block_size_log2(block_size, version)


def plaintext_block_for_disk_block(disk_block: int, version: int = FORMAT_VERSION) -> int:
    """The plaintext block size of a new store whose blocks are ``disk_block`` bytes on disk.

    ``disk_block`` is what ``kmsfs init --block-size`` takes: a power of two.
    """
    # Format 1's rule is exactly "a power of two in range", with its message.
    return block_size_from_log2(block_size_log2(disk_block, 1), version)


#: The plaintext block size of new stores (4068: 4096 on disk).
DEFAULT_BLOCK_SIZE = plaintext_block_for_disk_block(DEFAULT_DISK_BLOCK_SIZE)


# --------------------------------------------------------------------------- context


def canonical_context(context: dict[str, str]) -> bytes:
    """The canonical byte form of an encryption context (sorted keys, no spaces)."""
    if not context:
        return b""
    return json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_context(text: str | bytes) -> dict[str, str]:
    """Validate a user-supplied encryption context: a JSON object of string pairs.

    Raises FormatError with a message meant for the user.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError("encryption context is not valid UTF-8") from exc
    if len(text) > MAX_CONTEXT_CHARS:
        raise FormatError(f"encryption context is longer than {MAX_CONTEXT_CHARS} characters")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"encryption context is not valid JSON: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # an integer of 4300+ digits; nesting 1000 deep
        raise FormatError("encryption context is not valid JSON: too deeply nested or too large a number") from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FormatError("encryption context must be a JSON object of string keys and string values")
    try:
        canonical_context(value)
    except UnicodeEncodeError as exc:  # e.g. a lone surrogate written as "\ud800"
        raise FormatError("encryption context is not valid Unicode (lone surrogate escape)") from exc
    return value


def context_from_canonical(raw: bytes) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also: 4300+ digit integers, nesting 1000 deep
        raise FormatError("header context is not valid JSON") from exc
    if (
        not isinstance(value, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        or _canonical_or_none(value) != raw
    ):
        raise FormatError("header context is not in canonical form")
    return value


def _canonical_or_none(context: dict[str, str]) -> bytes | None:
    try:
        return canonical_context(context)
    except UnicodeEncodeError:  # a lone surrogate escape: has no UTF-8 form
        return None


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    """A parsed file header.  ``prefix`` is the wrap's associated data."""

    block_size: int
    file_id: bytes
    key_id: bytes
    key_version: int
    context: bytes  # canonical JSON, b"" for none
    wrap_nonce: bytes
    wrapped_dek: bytes
    version: int = FORMAT_VERSION

    def prefix(self) -> bytes:
        return header_prefix(self.block_size, self.file_id, self.key_id, self.key_version, self.context,
                             self.version)

    def to_bytes(self) -> bytes:
        return self.prefix() + self.wrap_nonce + self.wrapped_dek

    @property
    def context_dict(self) -> dict[str, str]:
        return context_from_canonical(self.context)


def header_prefix(
    block_size: int, file_id: bytes, key_id: bytes, key_version: int, context: bytes,
    version: int = FORMAT_VERSION,
) -> bytes:
    """The header bytes before the wrap nonce: the associated data of the DEK wrap."""
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(f"format version {version} is not supported")
    if len(file_id) != FILE_ID_SIZE:
        raise FormatError("file id must be 16 bytes")
    if len(key_id) != KEY_ID_SIZE:
        raise FormatError("key id must be 16 bytes")
    if not 1 <= key_version <= 0xFFFFFFFF:
        raise FormatError("key version out of range")
    if len(context) > MAX_CONTEXT_BYTES:
        raise FormatError("encryption context too long")
    return (
        _FIXED.pack(
            MAGIC, version, 0, block_size_log2(block_size, version), 0,
            file_id, key_id, key_version, len(context),
        )
        + context
    )


def parse_header(raw: bytes) -> Header:
    """Parse and validate a header; raises FormatError / UnsupportedVersion."""
    if len(raw) < 5:
        raise FormatError(f"header too short ({len(raw)} bytes)")
    if raw[:4] != MAGIC:
        raise FormatError("header has a wrong magic (not a kmsfs header)")
    if raw[4] not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"header format version {raw[4]} is not supported (this kmsfs reads "
            f"{', '.join(map(str, sorted(SUPPORTED_VERSIONS)))})"
        )
    if len(raw) < HEADER_MIN_SIZE:
        raise FormatError(f"header too short ({len(raw)} bytes)")
    magic, version, flags, bs_log2, reserved, file_id, key_id, key_version, ctx_len = _FIXED.unpack_from(raw)
    if flags != 0 or reserved != 0:
        raise FormatError("header has unknown flags set")
    block_size = block_size_from_log2(bs_log2, version)
    if key_version == 0:
        raise FormatError("header key version is 0")
    if ctx_len > MAX_CONTEXT_BYTES:
        raise FormatError("header context length out of range")
    expected = _FIXED.size + ctx_len + NONCE_SIZE + WRAPPED_DEK_SIZE
    if len(raw) != expected:
        raise FormatError(f"header length {len(raw)} does not match its fields (expected {expected})")
    pos = _FIXED.size
    context = bytes(raw[pos:pos + ctx_len])
    context_from_canonical(context)  # validates
    pos += ctx_len
    nonce = bytes(raw[pos:pos + NONCE_SIZE])
    pos += NONCE_SIZE
    wrapped = bytes(raw[pos:pos + WRAPPED_DEK_SIZE])
    return Header(block_size, bytes(file_id), bytes(key_id), key_version, context, nonce, wrapped, version)


# --------------------------------------------------------------------------- content geometry


def ciphertext_block_size(block_size: int) -> int:
    return block_size + BLOCK_OVERHEAD


def plaintext_size(ciphertext_size: int, block_size: int) -> int:
    """Plaintext size for a backing file of ``ciphertext_size`` bytes.

    Raises FormatError when the size cannot be produced by the format (a last
    block with no room for its nonce, tag and at least one byte).
    """
    full, rest = divmod(ciphertext_size, block_size + BLOCK_OVERHEAD)
    if rest == 0:
        return full * block_size
    if rest <= BLOCK_OVERHEAD:
        raise FormatError(f"ciphertext size {ciphertext_size} is not a valid kmsfs size")
    return full * block_size + rest - BLOCK_OVERHEAD


def plaintext_size_lenient(ciphertext_size: int, block_size: int) -> int:
    """Like plaintext_size, but for stat(): a damaged tail counts as absent."""
    full, rest = divmod(ciphertext_size, block_size + BLOCK_OVERHEAD)
    return full * block_size + max(0, rest - BLOCK_OVERHEAD)


def ciphertext_size(plain_size: int, block_size: int) -> int:
    full, rest = divmod(plain_size, block_size)
    return full * (block_size + BLOCK_OVERHEAD) + (rest + BLOCK_OVERHEAD if rest else 0)


def block_aad(file_id: bytes, block_number: int) -> bytes:
    """Associated data of one content block: binds it to its file and position."""
    return file_id + _BLOCK_NUMBER.pack(block_number)
