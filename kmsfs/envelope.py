"""Envelope encryption: a fresh DEK per file, wrapped by a CMK inside the HSM.

Sits between the key store (PKCS#11) and the backing-store I/O: it turns a
``user.kmsfs`` header into a ContentCipher and back.  The DEK exists
unwrapped only inside the returned ContentCipher (in OpenSSL's key schedule)
and in this function's frame, and in the daemon's DekCache (kmsfs/dekcache.py)
for a while after, so that opening a file it created or opened recently costs
no HSM call.  It is never logged or written anywhere.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import uuid

from .contentcrypt import ContentCipher
from .dekcache import DekCache
from .format import DEK_SIZE, FILE_ID_SIZE, FORMAT_VERSION, FormatError, Header, header_prefix, parse_header
from .keyregistry import ENABLED, KeyRecord, KeyRegistry
from .keystore import KeyStore

log = logging.getLogger(__name__)


class KeyUnusable(Exception):
    """The file's CMK is not Enabled (disabled, pending deletion or import)."""

    errno = errno.EACCES


class HeaderError(Exception):
    """The header is missing, malformed or of an unsupported version."""

    errno = errno.EIO


@functools.lru_cache(maxsize=1024)
def key_name(key_id: bytes) -> str:
    """The registry's name of a CMK (its UUID as text) from a header's 16 bytes."""
    return str(uuid.UUID(bytes=key_id))


#: What the DEK cache keeps for a header as stored: the header parsed, and the file's cipher.
Opened = tuple[Header, ContentCipher]


class Envelope:
    def __init__(self, keystore: KeyStore, registry: KeyRegistry, block_size: int,
                 format_version: int = FORMAT_VERSION) -> None:
        self.keystore = keystore
        self.registry = registry
        self.block_size = block_size
        #: The store's format: new files get headers of this version.
        self.format_version = format_version
        #: Headers unwrapped or made lately, opened (the daemon's); None: every open asks the HSM.
        self.dek_cache: DekCache[Opened] | None = None

    def seal_new(self, key: KeyRecord, context: bytes) -> tuple[Header, ContentCipher]:
        """A header for a new file under ``key``'s newest version, and its cipher."""
        self._require_enabled(key)
        dek = os.urandom(DEK_SIZE)
        file_id = os.urandom(FILE_ID_SIZE)
        key_uuid = key.key_uuid
        version = self.format_version
        prefix = header_prefix(self.block_size, file_id, key_uuid.bytes, key.CurrentVersion, context, version)
        nonce, wrapped = self.keystore.wrap_dek(key_uuid, key.CurrentVersion, dek, prefix)
        header = Header(self.block_size, file_id, key_uuid.bytes, key.CurrentVersion, context, nonce, wrapped,
                        version)
        cipher = ContentCipher(dek, file_id, self.block_size)
        if self.dek_cache is not None:
            self.dek_cache.put(header.to_bytes(), key_uuid.bytes, (header, cipher))
        return header, cipher

    def parse(self, raw: bytes) -> Header:
        try:
            return parse_header(raw)
        except FormatError as exc:
            raise HeaderError(str(exc)) from exc

    def key_of(self, header: Header) -> KeyRecord:
        return self.registry.snapshot().by_uuid(uuid.UUID(bytes=header.key_id))

    def _key_for_use(self, header: Header) -> KeyRecord:
        """``key_of`` for every open: keys.json as KeyRegistry.record_for_use sees it."""
        record = self.registry.record_for_use(key_name(header.key_id))
        return record if record is not None else self.key_of(header)  # key_of says why it is missing

    def open_cached(self, raw: bytes) -> Opened | None:
        """The header stored as ``raw``, parsed, and its cipher, if the DEK cache has them.

        No parse and no HSM call; None on a miss: then parse ``raw`` and call
        ``open`` with ``look_in_cache=False``.  The CMK must be Enabled, as
        for ``open`` (KeyUnusable or KeyNotFound otherwise).
        """
        cache = self.dek_cache
        if cache is None:
            return None
        opened = cache.get(raw)
        if opened is not None:
            self._require_enabled(self._key_for_use(opened[0]))
        return opened

    def open(self, header: Header, *, look_in_cache: bool = True) -> ContentCipher:
        """Unwrap the header's DEK in the HSM (one HSM call), unless the DEK cache has it.

        The CMK must be Enabled either way: the cache saves the HSM call only.
        ``look_in_cache``: False when ``open_cached`` has just missed.
        """
        self._require_enabled(self._key_for_use(header))
        cache = self.dek_cache
        if cache is None:
            return ContentCipher(self._unwrap(header), header.file_id, header.block_size)
        raw = header.to_bytes()
        opened = cache.get(raw) if look_in_cache else None
        if opened is None:
            opened = (header, ContentCipher(self._unwrap(header), header.file_id, header.block_size))
            cache.put(raw, header.key_id, opened)
        return opened[1]

    def rewrap(self, header: Header, key: KeyRecord) -> Header:
        """The same DEK and file id under ``key``'s newest version (no content change)."""
        self._require_enabled(self.key_of(header))
        self._require_enabled(key)
        dek = self._unwrap(header)
        key_uuid = key.key_uuid
        prefix = header_prefix(header.block_size, header.file_id, key_uuid.bytes, key.CurrentVersion,
                               header.context, header.version)
        nonce, wrapped = self.keystore.wrap_dek(key_uuid, key.CurrentVersion, dek, prefix)
        return Header(header.block_size, header.file_id, key_uuid.bytes, key.CurrentVersion,
                      header.context, nonce, wrapped, header.version)

    def _unwrap(self, header: Header) -> bytes:
        """The header's DEK, from the HSM (one call)."""
        return self.keystore.unwrap_dek(
            uuid.UUID(bytes=header.key_id), header.key_version, header.wrap_nonce, header.wrapped_dek,
            header.prefix(),
        )

    def forget_key(self, key_id: bytes) -> None:
        """Drop the cached DEKs of files under the CMK ``key_id`` (16 bytes)."""
        if self.dek_cache is not None:
            dropped = self.dek_cache.forget_key(key_id)
            if dropped:
                log.debug("dropped %d cached DEKs of CMK %s", dropped, uuid.UUID(bytes=key_id))

    @staticmethod
    def _require_enabled(key: KeyRecord) -> None:
        if key.KeyState != ENABLED:
            raise KeyUnusable(f"CMK {key.Alias} ({key.KeyId}) is {key.KeyState}")
