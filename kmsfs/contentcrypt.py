"""Content encryption: AES-256-GCM over runs of blocks.  Pure, no I/O.

The hot path of every read and write.  Per-block Python overhead is what
costs here, so a run of blocks is encrypted into one preallocated buffer with
``encrypt_into``, and all of the run's nonces come from a single
``os.urandom`` call.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .format import BLOCK_OVERHEAD, FILE_ID_SIZE, NONCE_SIZE, TAG_SIZE

_BLOCK_NUMBER = struct.Struct(">Q")


@functools.lru_cache(maxsize=None)
def _zero_block(ct_block_size: int) -> bytes:
    """A ciphertext block of zeros (a hole), shared by every cipher of that geometry.

    One per cipher would cost 4 KiB and a fill on every open.
    """
    return bytes(ct_block_size)


class BlockAuthError(Exception):
    """A content block failed authentication: tampered, moved, truncated or foreign."""

    def __init__(self, block_number: int, reason: str) -> None:
        super().__init__(f"block {block_number}: {reason}")
        self.block_number = block_number
        self.reason = reason


class ContentCipher:
    """Encrypts and decrypts the blocks of one file under its DEK."""

    __slots__ = ("_dek", "_aead", "_file_id", "block_size", "ct_block_size", "_zero_block")

    def __init__(self, dek: bytes, file_id: bytes, block_size: int) -> None:
        if len(file_id) != FILE_ID_SIZE:
            raise ValueError("file id must be 16 bytes")
        self._dek = bytes(dek)
        self._aead = AESGCM(dek)
        self._file_id = file_id
        self.block_size = block_size
        self.ct_block_size = block_size + BLOCK_OVERHEAD
        self._zero_block = _zero_block(self.ct_block_size)

    @property
    def file_id(self) -> bytes:
        return self._file_id

    def key_for_decrypt_helper(self) -> bytes:
        """The DEK itself, for the daemon's decrypt helper process (kmsfs/decrypthelper.py)
        only: never to be logged, printed or written."""
        return self._dek

    def encrypt(self, plaintext: bytes | bytearray | memoryview, first_block: int) -> bytearray:
        """Encrypt ``plaintext`` as consecutive blocks starting at ``first_block``.

        Every block but the last must be full; the result is the exact bytes to
        write at ``first_block * ct_block_size``.
        """
        return self.encrypt_parts((plaintext,), first_block)

    def encrypt_parts(self, parts: Sequence[bytes | bytearray | memoryview], first_block: int) -> bytearray:
        """Like ``encrypt`` of the parts joined, without joining them.

        Each part but the last must be a whole number of blocks.  A write that
        starts or ends inside a block passes its merged first and last blocks
        and the request's own buffer for the blocks between: no copy of the
        request into a staging buffer.
        """
        bs = self.block_size
        cbs = self.ct_block_size
        n = sum(len(p) for p in parts)
        if n == 0:
            return bytearray()
        nblocks = -(-n // bs)
        out = bytearray(n + nblocks * BLOCK_OVERHEAD)
        dst = memoryview(out)
        nonces = os.urandom(NONCE_SIZE * nblocks)
        file_id = self._file_id
        encrypt_into = self._aead.encrypt_into
        pack = _BLOCK_NUMBER.pack
        i = 0  # block index within the run
        for part in parts:
            src = memoryview(part)
            length = len(src)
            if length % bs and i + -(-length // bs) != nblocks:
                raise ValueError("only the last part may end inside a block")
            # The loop body is the per-block cost of every write: keep it minimal.
            for start in range(0, length, bs):
                o = i * cbs
                nonce = nonces[i * NONCE_SIZE:(i + 1) * NONCE_SIZE]
                dst[o:o + NONCE_SIZE] = nonce
                chunk = src[start:start + bs]
                encrypt_into(nonce, chunk, file_id + pack(first_block + i),
                             dst[o + NONCE_SIZE:o + NONCE_SIZE + len(chunk) + TAG_SIZE])
                i += 1
        return out

    def decrypt(self, ciphertext: bytes | bytearray | memoryview, first_block: int) -> bytearray:
        """Decrypt consecutive blocks; raises BlockAuthError naming the first bad block.

        A full-length block of zero bytes is a hole and decrypts to zeros.
        """
        n = len(ciphertext)
        if n == 0:
            return bytearray()
        out = bytearray(self.plaintext_length(n, first_block))  # zero-filled: holes need no write
        self._decrypt_run(memoryview(ciphertext), first_block, memoryview(out), holes_are_zero=True)
        return out

    def decrypt_into(self, ciphertext: bytes | bytearray | memoryview, first_block: int,
                     out: bytearray | memoryview) -> int:
        """``decrypt`` into ``out`` (which may hold anything), returning the plaintext length.

        For buffers that are reused from one read to the next: holes are
        written as zeros here.  On BlockAuthError, ``out`` holds garbage.
        """
        n = len(ciphertext)
        length = self.plaintext_length(n, first_block)
        if length > len(out):
            raise ValueError(f"{length} bytes of plaintext do not fit in a buffer of {len(out)}")
        if n:
            self._decrypt_run(memoryview(ciphertext), first_block, memoryview(out), holes_are_zero=False)
        return length

    def plaintext_length(self, ciphertext_length: int, first_block: int = 0) -> int:
        """Plaintext bytes in a run of blocks starting at ``first_block``; BlockAuthError
        if its last block is too short to hold any."""
        nblocks, rest = divmod(ciphertext_length, self.ct_block_size)
        if rest:
            if rest <= BLOCK_OVERHEAD:
                raise BlockAuthError(first_block + nblocks, f"truncated block ({rest} bytes)")
            nblocks += 1
        return ciphertext_length - nblocks * BLOCK_OVERHEAD

    def _decrypt_run(self, src: memoryview, first_block: int, dst: memoryview, holes_are_zero: bool) -> None:
        cbs = self.ct_block_size
        bs = self.block_size
        nblocks = -(-len(src) // cbs)
        file_id = self._file_id
        decrypt_into = self._aead.decrypt_into
        pack = _BLOCK_NUMBER.pack
        zero_block = self._zero_block
        for i in range(nblocks):
            o = i * cbs
            block = src[o:o + cbs]
            # A hole, left by a sparse write or truncate, is told apart before
            # decrypting: a failed decryption and its exception cost 4 us a
            # block.  Real data starts with a random nonce, so its first byte
            # nearly always settles it; bytes() because comparing a memoryview
            # goes byte by byte (4 us a block), a copy and memcmp do not.
            if not block[0] and bytes(block) == zero_block:
                if not holes_are_zero:
                    dst[i * bs:(i + 1) * bs] = zero_block[:bs]
                continue
            p = i * bs
            try:
                decrypt_into(block[:NONCE_SIZE], block[NONCE_SIZE:], file_id + pack(first_block + i),
                             dst[p:p + len(block) - BLOCK_OVERHEAD])
            except InvalidTag:
                raise BlockAuthError(first_block + i, "authentication failed") from None
