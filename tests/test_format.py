"""Golden vectors and negative tests pinning the kmsfs on-disk formats 1 and 2.

Format 2 (new stores) differs from format 1 only in the meaning of the
header's block_size_log2 byte: the ciphertext block is 2**log2 bytes (a page),
where format 1 made the plaintext block 2**log2.  Both are read and written;
each has its own golden vectors below.

Everything here runs in-process and mounts nothing.  The hex literals were
computed once and pasted: if one of them changes, the on-disk format changed,
and every existing store would become unreadable.  Do not "fix" a literal to
make a test pass; bump the format version instead.

The HSM tests at the end load SoftHSM2 into this process with a token made in
a temporary directory.  A PKCS#11 module is loaded once per process and reads
its configuration at C_Initialize, so the fixture sets SOFTHSM2_CONF first and
re-initialises the module if someone loaded it before, then restores it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs import format as fmt
from kmsfs.contentcrypt import BlockAuthError, ContentCipher
from kmsfs.format import (
    BLOCK_OVERHEAD,
    HEADER_MIN_SIZE,
    MAX_CONTEXT_BYTES,
    MAX_CONTEXT_CHARS,
    NONCE_SIZE,
    FormatError,
    Header,
    UnsupportedVersion,
    block_aad,
    canonical_context,
    ciphertext_size,
    header_prefix,
    parse_context,
    parse_header,
    plaintext_size,
    plaintext_size_lenient,
)

from conftest import require_fuse_and_hsm

B = 4096  # format 1's default plaintext block
CB = B + BLOCK_OVERHEAD
B2 = 4096 - BLOCK_OVERHEAD  # format 2's default plaintext block: 4096 bytes on disk

# --------------------------------------------------------------------------- (a) header golden vector

G_FILE_ID = bytes(range(16))
G_KEY_ID = bytes(range(16, 32))
G_KEY_VERSION = 3
G_CONTEXT = canonical_context({"b": "2", "a": "1"})
G_NONCE = bytes(range(0xA0, 0xAC))
G_WRAPPED = bytes(range(0xC0, 0xF0))

# Written out field by field, as docs/format.md lays the header out.
G_PREFIX_HEX = (
    "4b4d5346"                                  # magic "KMSF"
    "01"                                        # version 1
    "00"                                        # flags
    "0c"                                        # block_size_log2 = 12 (4096)
    "00"                                        # reserved
    "000102030405060708090a0b0c0d0e0f"          # file_id
    "101112131415161718191a1b1c1d1e1f"          # key_id
    "00000003"                                  # key_version 3, big-endian
    "0011"                                      # context_len 17
    "7b2261223a2231222c2262223a2232227d"        # {"a":"1","b":"2"} (sorted, no spaces)
)
G_HEADER_HEX = (
    G_PREFIX_HEX
    + "a0a1a2a3a4a5a6a7a8a9aaab"                # wrap_nonce
    + "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"  # wrapped_dek
)
# The same bytes as computed once by Header.to_bytes() when this test was written.
G_HEADER_HEX_COMPUTED = (
    "4b4d534601000c00000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00000003"
    "00117b2261223a2231222c2262223a2232227da0a1a2a3a4a5a6a7a8a9aaabc0c1c2c3c4c5c6c7c8c9cacbcc"
    "cdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
)
G_HEADER = bytes.fromhex(G_HEADER_HEX)


def golden_header() -> Header:
    return Header(B, G_FILE_ID, G_KEY_ID, G_KEY_VERSION, G_CONTEXT, G_NONCE, G_WRAPPED, version=1)


def test_golden_literal_is_consistent():
    assert G_HEADER_HEX == G_HEADER_HEX_COMPUTED
    assert len(G_HEADER) == 46 + 17 + 12 + 48 == 123


def test_header_serialises_to_golden_bytes():
    assert golden_header().to_bytes().hex() == G_HEADER_HEX
    assert G_CONTEXT == b'{"a":"1","b":"2"}'


def test_parse_golden_header_gives_back_the_fields():
    h = parse_header(G_HEADER)
    assert h == golden_header()
    assert h.block_size == 4096
    assert h.file_id == G_FILE_ID
    assert h.key_id == G_KEY_ID
    assert h.key_version == 3
    assert h.context == b'{"a":"1","b":"2"}'
    assert h.context_dict == {"a": "1", "b": "2"}
    assert h.wrap_nonce == G_NONCE
    assert h.wrapped_dek == G_WRAPPED
    # Accepts any bytes-like input.
    assert parse_header(bytearray(G_HEADER)) == h
    assert parse_header(memoryview(G_HEADER)) == h


def test_prefix_is_the_exact_wrap_aad():
    h = parse_header(G_HEADER)
    assert h.prefix() == bytes.fromhex(G_PREFIX_HEX)
    assert h.prefix() == G_HEADER[:46 + 17]
    assert header_prefix(B, G_FILE_ID, G_KEY_ID, G_KEY_VERSION, G_CONTEXT, 1) == h.prefix()
    # The AAD covers every field before the nonce; nothing after it.
    assert G_HEADER[len(h.prefix()):] == G_NONCE + G_WRAPPED


def test_golden_header_without_context():
    h = Header(1 << 20, bytes(16), b"\xff" * 16, 1, b"", b"\x01" * 12, b"\x02" * 48, version=1)
    raw = h.to_bytes()
    assert raw.hex() == (
        "4b4d5346" "01" "00" "14" "00" + "00" * 16 + "ff" * 16 + "00000001" "0000"
        + "01" * 12 + "02" * 48
    )
    assert len(raw) == HEADER_MIN_SIZE == 106
    assert parse_header(raw) == h
    assert h.context_dict == {}


@pytest.mark.parametrize("log2", range(12, 21))
@pytest.mark.parametrize("version,overhead", [(1, 0), (2, BLOCK_OVERHEAD)])
def test_every_block_size_round_trips(log2, version, overhead):
    h = Header((1 << log2) - overhead, G_FILE_ID, G_KEY_ID, 7, b"", G_NONCE, G_WRAPPED, version=version)
    raw = h.to_bytes()
    assert raw[4] == version and raw[6] == log2
    assert parse_header(raw) == h


# --------------------------------------------------------------------------- (b) content block golden vectors

DEK = bytes(range(32))
FILE_ID0 = bytes(16)
PLAIN = b"kmsfs v1 golden block\n"
NONCE_B0 = bytes(range(0x10, 0x1C))
NONCE_B5 = bytes(range(0x50, 0x5C))
BLOCK0_HEX = "101112131415161718191a1b" "1693eb703ae94c82ea1267716b1c0773b53c216d70c826d489a74ef67bb723da7db3bd0bbe86"
BLOCK5_HEX = "505152535455565758595a5b" "f94a45129770cfd77cd15209a984edf581439288497bc4559006742590a8db53661ad6048ebd"


def test_block_aad_layout():
    assert block_aad(FILE_ID0, 0) == bytes(24)
    assert block_aad(G_FILE_ID, 5).hex() == "000102030405060708090a0b0c0d0e0f" "0000000000000005"
    assert block_aad(G_FILE_ID, 2**64 - 1)[16:] == b"\xff" * 8


@pytest.mark.parametrize("number,nonce,golden", [(0, NONCE_B0, BLOCK0_HEX), (5, NONCE_B5, BLOCK5_HEX)])
def test_block_golden_vector_is_nonce_then_aesgcm(number, nonce, golden):
    expected = nonce + AESGCM(DEK).encrypt(nonce, PLAIN, FILE_ID0 + struct.pack(">Q", number))
    assert expected.hex() == golden
    assert len(expected) == len(PLAIN) + BLOCK_OVERHEAD


@pytest.mark.parametrize("number,golden", [(0, BLOCK0_HEX), (5, BLOCK5_HEX)])
def test_content_cipher_decrypts_golden_blocks(number, golden):
    cc = ContentCipher(DEK, FILE_ID0, B)
    assert bytes(cc.decrypt(bytes.fromhex(golden), number)) == PLAIN


@pytest.mark.parametrize("number,nonce,golden", [(0, NONCE_B0, BLOCK0_HEX), (5, NONCE_B5, BLOCK5_HEX)])
def test_content_cipher_encrypts_golden_blocks(monkeypatch, number, nonce, golden):
    calls = []

    def fake_urandom(n):
        calls.append(n)
        assert n == 12
        return nonce

    monkeypatch.setattr("kmsfs.contentcrypt.os.urandom", fake_urandom)
    cc = ContentCipher(DEK, FILE_ID0, B)
    assert bytes(cc.encrypt(PLAIN, number)).hex() == golden
    assert calls == [12]


def test_content_cipher_multi_block_layout(monkeypatch):
    nonces = bytes(range(36))  # three nonces from one urandom call
    monkeypatch.setattr("kmsfs.contentcrypt.os.urandom", lambda n: nonces[:n])
    plain = bytes(range(256)) * 32 + b"x" * 100  # two full blocks and 100 bytes
    cc = ContentCipher(DEK, G_FILE_ID, B)
    out = bytes(cc.encrypt(plain, 7))
    assert len(out) == 2 * CB + 100 + BLOCK_OVERHEAD
    aead = AESGCM(DEK)
    for i in range(3):
        block = out[i * CB:(i + 1) * CB]
        assert block[:12] == nonces[12 * i:12 * (i + 1)]
        assert aead.decrypt(block[:12], block[12:], G_FILE_ID + struct.pack(">Q", 7 + i)) == plain[i * B:(i + 1) * B]
    assert bytes(cc.decrypt(out, 7)) == plain
    # Decrypting the middle block alone, at its own number.
    assert bytes(cc.decrypt(out[CB:2 * CB], 8)) == plain[B:2 * B]


def test_empty_encrypt_and_decrypt():
    cc = ContentCipher(DEK, FILE_ID0, B)
    assert cc.encrypt(b"", 0) == bytearray()
    assert cc.decrypt(b"", 3) == bytearray()


def test_content_cipher_rejects_bad_file_id():
    with pytest.raises(ValueError):
        ContentCipher(DEK, bytes(15), B)


# --------------------------------------------------------------------------- (c) size arithmetic

SIZE_TABLE = [
    # (ciphertext size, plaintext size) for 4 KiB blocks
    (0, 0),
    (29, 1),
    (30, 2),
    (CB - 1, B - 1),
    (CB, B),
    (CB + 29, B + 1),
    (2 * CB, 2 * B),
    (3 * CB + 17 + 28, 3 * B + 17),
    (1000 * CB, 1000 * B),
]


@pytest.mark.parametrize("ct,pt", SIZE_TABLE)
def test_size_table(ct, pt):
    assert plaintext_size(ct, B) == pt
    assert ciphertext_size(pt, B) == ct
    assert plaintext_size_lenient(ct, B) == pt


@pytest.mark.parametrize("full", [0, 1, 2, 100])
@pytest.mark.parametrize("rest", range(1, BLOCK_OVERHEAD + 1))
def test_invalid_sizes_are_refused(full, rest):
    ct = full * CB + rest
    with pytest.raises(FormatError, match="not a valid kmsfs size"):
        plaintext_size(ct, B)
    # stat() treats the damaged tail as absent.
    assert plaintext_size_lenient(ct, B) == full * B


def test_sizes_for_large_blocks():
    big = 1 << 20
    assert ciphertext_size(big + 1, big) == big + 28 + 1 + 28
    assert plaintext_size(big + 28 + 1 + 28, big) == big + 1
    with pytest.raises(FormatError):
        plaintext_size(big + 28 + 28, big)


block_sizes = st.integers(12, 20).map(lambda n: 1 << n)


@settings(max_examples=300, deadline=None)
@given(plain=st.integers(0, 1 << 40), bs=block_sizes)
def test_plain_size_round_trip(plain, bs):
    ct = ciphertext_size(plain, bs)
    assert plaintext_size(ct, bs) == plain
    assert plaintext_size_lenient(ct, bs) == plain
    assert ct >= plain
    # One ciphertext block per started plaintext block.
    assert ct - plain == BLOCK_OVERHEAD * -(-plain // bs)


@settings(max_examples=300, deadline=None)
@given(ct=st.integers(0, 1 << 40), bs=block_sizes)
def test_ciphertext_size_is_valid_or_refused(ct, bs):
    rest = ct % (bs + BLOCK_OVERHEAD)
    if 1 <= rest <= BLOCK_OVERHEAD:
        with pytest.raises(FormatError):
            plaintext_size(ct, bs)
        assert ciphertext_size(plaintext_size_lenient(ct, bs), bs) == ct - rest
    else:
        assert ciphertext_size(plaintext_size(ct, bs), bs) == ct


@pytest.mark.parametrize("size", [0, 1, 2048, 3000, 4095, 4097, 6144, 1 << 21, 1 << 11, -4096])
def test_bad_block_sizes(size):
    with pytest.raises(FormatError, match="power of two"):
        fmt.block_size_log2(size, 1)
    with pytest.raises(FormatError, match="power of two"):
        fmt.block_size_log2(size - BLOCK_OVERHEAD, 2)
    with pytest.raises(FormatError, match="power of two"):
        fmt.plaintext_block_for_disk_block(size)


def test_good_block_sizes():
    assert [fmt.block_size_log2(1 << n, 1) for n in range(12, 21)] == list(range(12, 21))
    assert [fmt.block_size_log2((1 << n) - 28, 2) for n in range(12, 21)] == list(range(12, 21))
    assert [fmt.block_size_from_log2(n, 1) for n in range(12, 21)] == [1 << n for n in range(12, 21)]
    assert [fmt.block_size_from_log2(n, 2) for n in range(12, 21)] == [(1 << n) - 28 for n in range(12, 21)]
    assert fmt.plaintext_block_for_disk_block(4096) == fmt.DEFAULT_BLOCK_SIZE == 4068
    assert fmt.disk_block_size(4068, 2) == 4096 and fmt.disk_block_size(4096, 1) == 4096
    # A power of two is not a format-2 plaintext block, and the reverse.
    with pytest.raises(FormatError):
        fmt.block_size_log2(4096, 2)
    with pytest.raises(FormatError):
        fmt.block_size_log2(4068, 1)
    for n in (11, 21, 0, 255):
        for version in (1, 2):
            with pytest.raises(FormatError):
                fmt.block_size_from_log2(n, version)


# --------------------------------------------------------------------------- (d) header negative tests


def patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


def test_wrong_magic():
    for magic in (b"KMSG", b"kmsf", b"\0\0\0\0", b"FSMK"):
        with pytest.raises(FormatError, match="magic") as info:
            parse_header(patched(G_HEADER, 0, magic))
        assert not isinstance(info.value, UnsupportedVersion)


@pytest.mark.parametrize("version", [0, 3, 127, 255])
def test_unsupported_versions(version):
    raw = patched(G_HEADER, 4, bytes([version]))
    with pytest.raises(UnsupportedVersion) as info:
        parse_header(raw)
    message = str(info.value)
    assert f"version {version} is not supported" in message
    assert "reads 1, 2" in message
    assert isinstance(info.value, FormatError)
    # Even a short header of another version says so, rather than "too short".
    with pytest.raises(UnsupportedVersion):
        parse_header(raw[:10])


@pytest.mark.parametrize("offset", [5, 7])
@pytest.mark.parametrize("value", [1, 0x80, 0xFF])
def test_nonzero_flags_or_reserved(offset, value):
    with pytest.raises(FormatError, match="flags"):
        parse_header(patched(G_HEADER, offset, bytes([value])))


@pytest.mark.parametrize("log2", [0, 11, 21, 32, 255])
def test_block_size_log2_out_of_range(log2):
    with pytest.raises(FormatError, match="block size"):
        parse_header(patched(G_HEADER, 6, bytes([log2])))


def test_key_version_zero():
    with pytest.raises(FormatError, match="key version is 0"):
        parse_header(patched(G_HEADER, 40, bytes(4)))
    with pytest.raises(FormatError):
        header_prefix(B, G_FILE_ID, G_KEY_ID, 0, b"", 1)
    # The largest version is fine.
    h = parse_header(patched(G_HEADER, 40, b"\xff" * 4))
    assert h.key_version == 2**32 - 1


def test_context_len_too_large():
    with pytest.raises(FormatError, match="out of range"):
        parse_header(patched(G_HEADER, 44, struct.pack(">H", MAX_CONTEXT_BYTES + 1)))
    with pytest.raises(FormatError, match="out of range"):
        parse_header(patched(G_HEADER, 44, b"\xff\xff"))


@pytest.mark.parametrize("delta", [-17, -1, 1, 60])
def test_context_len_inconsistent_with_length(delta):
    raw = patched(G_HEADER, 44, struct.pack(">H", 17 + delta))
    with pytest.raises(FormatError, match="does not match"):
        parse_header(raw)


def test_truncated_at_every_length():
    for n in range(len(G_HEADER)):
        with pytest.raises(FormatError) as info:
            parse_header(G_HEADER[:n])
        assert not isinstance(info.value, UnsupportedVersion), n


def test_one_byte_too_long():
    for extra in (b"\0", b"\xff"):
        with pytest.raises(FormatError, match="does not match"):
            parse_header(G_HEADER + extra)


def header_with_context(ctx: bytes) -> bytes:
    return (
        struct.pack(">4sBBBB16s16sIH", b"KMSF", 1, 0, 12, 0, G_FILE_ID, G_KEY_ID, 3, len(ctx))
        + ctx + G_NONCE + G_WRAPPED
    )


def test_header_with_context_helper_matches_golden():
    assert header_with_context(G_CONTEXT) == G_HEADER


@pytest.mark.parametrize("ctx", [
    b'{"b":"2","a":"1"}',        # keys not sorted
    b'{"a": "1","b":"2"}',       # space
    b'{"a":"1","b":"2"} ',       # trailing space
    b'{"a":"\\u0031","b":"2"}',  # needless escape
    b"{}",                       # an empty context is stored as no bytes at all
    b"[]",
    b'"a"',
    b"null",
    b"1",
    b'{"a":"1"',                 # not JSON
    b'{"a":1}',                  # not a string value
    b'{"a":null}',
    b'{"a":{"b":"c"}}',
    b'{"a":"\\ud800"}',          # lone surrogate escape: no UTF-8 form at all
])
def test_non_canonical_context_is_refused(ctx):
    with pytest.raises(FormatError, match="context"):
        parse_header(header_with_context(ctx))


@pytest.mark.parametrize("ctx", [b"\xff\xfe", b'{"a":"\xc3"}', b'{"a":"\xed\xa0\x80"}'])
def test_non_utf8_context_is_refused(ctx):
    with pytest.raises(FormatError, match="context"):
        parse_header(header_with_context(ctx))


def test_non_ascii_canonical_context_is_accepted():
    ctx = canonical_context({"ключ": "значение", "z": "日本"})
    assert ctx == '{"z":"日本","ключ":"значение"}'.encode()
    h = parse_header(header_with_context(ctx))
    assert h.context_dict == {"ключ": "значение", "z": "日本"}


def test_header_prefix_validates_its_fields():
    with pytest.raises(FormatError):
        header_prefix(B, bytes(15), G_KEY_ID, 1, b"")
    with pytest.raises(FormatError):
        header_prefix(B, G_FILE_ID, bytes(17), 1, b"")
    with pytest.raises(FormatError):
        header_prefix(B, G_FILE_ID, G_KEY_ID, 2**32, b"")
    with pytest.raises(FormatError):
        header_prefix(B, G_FILE_ID, G_KEY_ID, 1, b"x" * (MAX_CONTEXT_BYTES + 1))
    with pytest.raises(FormatError):
        header_prefix(3000, G_FILE_ID, G_KEY_ID, 1, b"")


def test_longest_context_fits():
    value = "\U0001F600" * (MAX_CONTEXT_CHARS - 9)  # 4 UTF-8 bytes per character
    text = json.dumps({"k": value}, ensure_ascii=False)
    assert len(text) <= MAX_CONTEXT_CHARS
    ctx = canonical_context(parse_context(text))
    assert len(ctx) <= MAX_CONTEXT_BYTES
    assert parse_header(header_with_context(ctx)).context_dict == {"k": value}


# --------------------------------------------------------------------------- (e) parse_context


@pytest.mark.parametrize("text,expected", [
    ("", {}),
    ("   ", {}),
    ("{}", {}),
    ('{"a":"1"}', {"a": "1"}),
    (' { "b" : "2" , "a" : "1" } ', {"a": "1", "b": "2"}),
    ('{"dept":"finance","Project":"x y"}', {"dept": "finance", "Project": "x y"}),
    ('{"k":""}', {"k": ""}),
    ('{"ключ":"значение"}', {"ключ": "значение"}),
    (b'{"a":"1"}', {"a": "1"}),
    ('{"a":"' + "x" * (MAX_CONTEXT_CHARS - 8) + '"}', {"a": "x" * (MAX_CONTEXT_CHARS - 8)}),
])
def test_parse_context_valid(text, expected):
    assert parse_context(text) == expected


def test_canonical_context_sorts_and_strips():
    assert canonical_context({}) == b""
    assert canonical_context(parse_context(' { "b" : "2" , "a" : "1" } ')) == b'{"a":"1","b":"2"}'


def test_parse_context_too_long():
    text = '{"a":"' + "x" * (MAX_CONTEXT_CHARS - 7) + '"}'
    assert len(text) == MAX_CONTEXT_CHARS + 1
    with pytest.raises(FormatError, match=f"longer than {MAX_CONTEXT_CHARS} characters"):
        parse_context(text)
    with pytest.raises(FormatError, match="longer than"):
        parse_context(text.encode())


@pytest.mark.parametrize("text", ["[]", '["a","b"]', '"a"', "1", "1.5", "null", "true"])
def test_parse_context_non_object(text):
    with pytest.raises(FormatError, match="must be a JSON object"):
        parse_context(text)


@pytest.mark.parametrize("text", ['{"a":1}', '{"a":null}', '{"a":true}', '{"a":["x"]}', '{"a":{"b":"c"}}',
                                  '{"a":"1","b":2}'])
def test_parse_context_non_string_values(text):
    with pytest.raises(FormatError, match="string keys and string values"):
        parse_context(text)


@pytest.mark.parametrize("text", ["{", '{"a":"1",}', "{'a':'1'}", '{"a":"1"}x', "NaN-ish", '{"a" "1"}'])
def test_parse_context_invalid_json(text):
    with pytest.raises(FormatError, match="not valid JSON"):
        parse_context(text)


@pytest.mark.parametrize("raw", [b"\xff", b'{"a":"\xff"}', b'{"a":"\xc3"}', b"\xed\xa0\x80"])
def test_parse_context_non_utf8(raw):
    with pytest.raises(FormatError, match="not valid UTF-8"):
        parse_context(raw)


def test_parse_context_lone_surrogate_escape_is_refused():
    # Valid JSON, but the string cannot be stored as UTF-8: refuse it here
    # rather than fail later when the header is written.
    with pytest.raises(FormatError):
        parse_context('{"a":"\\ud800"}')


# --------------------------------------------------------------------------- (f) ContentCipher tamper detection


def golden_blocks() -> tuple[ContentCipher, bytes, bytes]:
    cc = ContentCipher(DEK, G_FILE_ID, B)
    plain = bytes((i * 7) & 0xFF for i in range(3 * B + 100))
    return cc, plain, bytes(cc.encrypt(plain, 10))


def flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
@pytest.mark.parametrize("block", [0, 1, 3])
def test_flipped_bit_names_the_block(where, block):
    cc, plain, ct = golden_blocks()
    start = block * CB
    length = CB if block < 3 else 100 + BLOCK_OVERHEAD
    pos = {"nonce": start + 5, "ciphertext": start + 12 + 50, "tag": start + length - 1}[where]
    for bit in (0, 7):
        with pytest.raises(BlockAuthError) as info:
            cc.decrypt(flip(ct, pos, bit), 10)
        assert info.value.block_number == 10 + block
        assert f"block {10 + block}" in str(info.value)
    assert bytes(cc.decrypt(ct, 10)) == plain


def test_block_at_wrong_number():
    cc, plain, ct = golden_blocks()
    block1 = ct[CB:2 * CB]
    assert bytes(cc.decrypt(block1, 11)) == plain[B:2 * B]
    for wrong in (0, 10, 12, 11 + 2**32):
        with pytest.raises(BlockAuthError) as info:
            cc.decrypt(block1, wrong)
        assert info.value.block_number == wrong
    # Two blocks swapped: the first one out of place is named.
    swapped = ct[CB:2 * CB] + ct[:CB] + ct[2 * CB:]
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(swapped, 10)
    assert info.value.block_number == 10


def test_block_with_wrong_file_id():
    cc, plain, ct = golden_blocks()
    other = ContentCipher(DEK, bytes(15) + b"\x01", B)
    with pytest.raises(BlockAuthError) as info:
        other.decrypt(ct, 10)
    assert info.value.block_number == 10


def test_block_with_wrong_dek():
    cc, plain, ct = golden_blocks()
    other = ContentCipher(bytes(32), G_FILE_ID, B)
    with pytest.raises(BlockAuthError):
        other.decrypt(ct, 10)


@pytest.mark.parametrize("tail", range(1, BLOCK_OVERHEAD + 1))
def test_truncated_tail_names_the_block(tail):
    cc, plain, ct = golden_blocks()
    data = ct[:2 * CB + tail]
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(data, 10)
    assert info.value.block_number == 12
    assert "truncated" in info.value.reason


@pytest.mark.parametrize("cut", [1, 50, 99])
def test_truncated_inside_last_block_fails_authentication(cut):
    cc, plain, ct = golden_blocks()
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(ct[:-cut], 10)
    assert info.value.block_number == 13


def test_full_zero_block_is_a_hole():
    cc, plain, ct = golden_blocks()
    assert bytes(cc.decrypt(bytes(CB), 0)) == bytes(B)
    holed = ct[:CB] + bytes(CB) + ct[2 * CB:]
    assert bytes(cc.decrypt(holed, 10)) == plain[:B] + bytes(B) + plain[2 * B:]


@pytest.mark.parametrize("length", [BLOCK_OVERHEAD + 1, BLOCK_OVERHEAD + 100, CB - 1])
def test_short_zero_block_is_not_a_hole(length):
    cc = ContentCipher(DEK, G_FILE_ID, B)
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(bytes(length), 4)
    assert info.value.block_number == 4
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(bytes(CB) + bytes(length), 4)
    assert info.value.block_number == 5


@pytest.mark.parametrize("position", [0, 1, NONCE_SIZE, CB // 2, CB - 1])
def test_almost_zero_block_is_not_a_hole(position):
    cc = ContentCipher(DEK, G_FILE_ID, B)
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(bytes(CB) + flip(bytes(CB), position), 6)
    assert info.value.block_number == 7


def test_data_whose_nonce_starts_with_zero_bytes_is_not_taken_for_a_hole(monkeypatch):
    """Holes are told apart by their first byte before decrypting: data that
    starts with zero bytes must still decrypt, every block of it."""
    plain = os.urandom(3 * B)  # a block taken for a hole would read as zeros
    monkeypatch.setattr("kmsfs.contentcrypt.os.urandom", lambda n: (bytes(NONCE_SIZE - 1) + b"\x01") * (n // NONCE_SIZE))
    cc = ContentCipher(DEK, G_FILE_ID, B)
    ct = cc.encrypt(plain, 2)
    assert all(ct[i * CB] == 0 for i in range(3))
    assert bytes(cc.decrypt(ct, 2)) == plain
    with pytest.raises(BlockAuthError) as info:
        cc.decrypt(ct[:CB] + flip(ct[CB:2 * CB], CB - 1) + ct[2 * CB:], 2)
    assert info.value.block_number == 3


def test_cipherfile_reports_a_stub_tail_on_every_read_that_reaches_the_end(tmp_path: Path):
    """1..28 bytes left of a cut block: stat() leaves them out, reads at the end fail.

    The kernel never asks past the size stat() reported, so a check only for
    reads beyond that size would never fire through a mount.
    """
    from kmsfs.cipherfile import CipherFile

    cc, plain, _ = golden_blocks()
    path = tmp_path / "f"
    path.write_bytes(bytes(cc.encrypt(plain, 0))[:3 * CB + 5])
    fd = os.open(path, os.O_RDONLY)
    try:
        cf = CipherFile(fd, cc)
        assert cf.size() == 3 * B
        assert cf.read(0, B) == plain[:B]
        assert cf.read(B, 2 * B - 1) == plain[B:3 * B - 1]
        for offset, length in ((2 * B, B), (0, 3 * B), (0, 1 << 17), (3 * B, 4096), (3 * B - 1, 1)):
            with pytest.raises(BlockAuthError) as info:
                cf.read(offset, length)
            assert info.value.block_number == 3
        assert cf.read(0, 0) == b""
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- (g) HSM golden vectors

HSM_KEY_UUID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
HSM_CMK = bytes(range(0x40, 0x60))
HSM_DEK = DEK
HSM_NONCE = bytes(range(0xA0, 0xAC))
# A complete header for file id bytes(16) under CMK HSM_KEY_UUID v1, no
# context, whose DEK (bytes(range(32))) was wrapped in software under HSM_CMK.
HSM_HEADER_HEX = (
    "4b4d534601000c00" + "00" * 16 + "00112233445566778899aabbccddeeff" + "00000001" + "0000"
    + "a0a1a2a3a4a5a6a7a8a9aaab"
    + "d78e043ce6ee9a2a71664bf585b13ef9ff06e7d4f87a933afac5f481f5df60e7"  # wrapped DEK
    + "8f1df62e34891907a6089914c0f996ce"                                   # its tag
)
PIN = "1234-golden"


def _softhsm_module() -> str:
    from kmsfs.embedded_hsm import find_softhsm2_module

    return find_softhsm2_module()


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    """A SoftHSM2 token in a temporary directory with known AES keys imported."""
    require_fuse_and_hsm()
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    from kmsfs import keystore as ks
    from kmsfs.pkcs11uri import Pkcs11Uri

    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    label = "kmsfs-golden"
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "5678-so"],
        env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    module = _softhsm_module()
    already_loaded = module in ks._loaded_libs
    lib = ks._load_module(module)
    if already_loaded:
        lib.reinitialize()  # make SoftHSM2 read our configuration
    try:
        token = lib.get_token(token_label=label)
        with token.open(user_pin=PIN, rw=True) as session:
            for version in (1, 2, 3):
                session.create_object({
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: HSM_CMK,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.MODIFIABLE: True,
                    Attribute.ID: ks.object_id(HSM_KEY_UUID, version),
                    Attribute.LABEL: ks.object_label(HSM_KEY_UUID, version),
                })
        store = ks.KeyStore(Pkcs11Uri(token=label, module_path=module, pin_value=PIN))
        try:
            yield store
        finally:
            store.close()
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        # Leave the module as a later user would expect to find it.
        try:
            lib.reinitialize()
        except pkcs11.PKCS11Error:
            pass


def golden_hsm_header() -> Header:
    return parse_header(bytes.fromhex(HSM_HEADER_HEX))


def test_hsm_header_golden_is_software_aesgcm():
    h = golden_hsm_header()
    assert h.key_id == HSM_KEY_UUID.bytes and h.key_version == 1 and h.file_id == FILE_ID0
    assert h.wrap_nonce == HSM_NONCE
    assert AESGCM(HSM_CMK).encrypt(HSM_NONCE, HSM_DEK, h.prefix()) == h.wrapped_dek


def test_hsm_object_id():
    from kmsfs.keystore import object_id

    assert object_id(HSM_KEY_UUID, 1).hex() == "00112233445566778899aabbccddeeff00000001"
    assert object_id(HSM_KEY_UUID, 258).hex()[-8:] == "00000102"


def test_hsm_unwrap_of_software_wrap(hsm):
    h = golden_hsm_header()
    assert hsm.unwrap(HSM_KEY_UUID, 1, h.wrap_nonce, h.wrapped_dek, h.prefix()) == HSM_DEK
    assert hsm.unwrap_dek(HSM_KEY_UUID, 1, h.wrap_nonce, h.wrapped_dek, h.prefix()) == HSM_DEK


def test_hsm_wrap_decrypts_in_software(hsm):
    h = golden_hsm_header()
    nonce, sealed = hsm.wrap_dek(HSM_KEY_UUID, 1, HSM_DEK, h.prefix())
    assert len(nonce) == 12 and len(sealed) == 48
    assert nonce != HSM_NONCE  # fresh random nonce
    assert AESGCM(HSM_CMK).decrypt(nonce, sealed, h.prefix()) == HSM_DEK
    # And a header built from it parses and round-trips through the HSM.
    h2 = Header(B, h.file_id, h.key_id, 1, b"", nonce, sealed, version=1)
    h3 = parse_header(h2.to_bytes())
    assert hsm.unwrap_dek(HSM_KEY_UUID, 1, h3.wrap_nonce, h3.wrapped_dek, h3.prefix()) == HSM_DEK


def test_hsm_wrap_with_deterministic_nonce_gives_golden(hsm, monkeypatch):
    monkeypatch.setattr("kmsfs.keystore.os.urandom", lambda n: HSM_NONCE[:n])
    h = golden_hsm_header()
    assert hsm.wrap_dek(HSM_KEY_UUID, 1, HSM_DEK, h.prefix()) == (h.wrap_nonce, h.wrapped_dek)


def test_hsm_wrong_aad_fails(hsm):
    from kmsfs.keystore import HsmUnwrapFailed

    h = golden_hsm_header()
    for bad_aad in (h.prefix()[:-1], h.prefix() + b"\0", flip(h.prefix(), 8), b""):
        with pytest.raises(HsmUnwrapFailed):
            hsm.unwrap(HSM_KEY_UUID, 1, h.wrap_nonce, h.wrapped_dek, bad_aad)
    with pytest.raises(HsmUnwrapFailed):
        hsm.unwrap(HSM_KEY_UUID, 1, flip(h.wrap_nonce, 0), h.wrapped_dek, h.prefix())
    with pytest.raises(HsmUnwrapFailed):
        hsm.unwrap(HSM_KEY_UUID, 1, h.wrap_nonce, flip(h.wrapped_dek, 47), h.prefix())
    with pytest.raises(HsmUnwrapFailed):
        hsm.unwrap(HSM_KEY_UUID, 1, h.wrap_nonce[:11], h.wrapped_dek, h.prefix())
    # The session is still usable afterwards.
    assert hsm.unwrap(HSM_KEY_UUID, 1, h.wrap_nonce, h.wrapped_dek, h.prefix()) == HSM_DEK


def test_hsm_disabled_key_is_refused(hsm):
    from kmsfs.keystore import HsmKeyRefused

    h = golden_hsm_header()
    hsm.set_usable(HSM_KEY_UUID, 2, False)
    try:
        with pytest.raises(HsmKeyRefused):
            hsm.unwrap(HSM_KEY_UUID, 2, h.wrap_nonce, h.wrapped_dek, h.prefix())
        with pytest.raises(HsmKeyRefused):
            hsm.wrap_dek(HSM_KEY_UUID, 2, HSM_DEK, h.prefix())
        # Another version of the same key id is not affected.
        assert hsm.unwrap(HSM_KEY_UUID, 1, h.wrap_nonce, h.wrapped_dek, h.prefix()) == HSM_DEK
    finally:
        hsm.set_usable(HSM_KEY_UUID, 2, True)
    assert hsm.unwrap(HSM_KEY_UUID, 2, h.wrap_nonce, h.wrapped_dek, h.prefix()) == HSM_DEK


def test_hsm_destroyed_key_is_missing(hsm):
    from kmsfs.keystore import HsmKeyMissing

    h = golden_hsm_header()
    assert hsm.has_key(HSM_KEY_UUID, 3)
    assert hsm.unwrap(HSM_KEY_UUID, 3, h.wrap_nonce, h.wrapped_dek, h.prefix()) == HSM_DEK
    hsm.destroy_key(HSM_KEY_UUID, 3)
    assert not hsm.has_key(HSM_KEY_UUID, 3)
    with pytest.raises(HsmKeyMissing):
        hsm.unwrap(HSM_KEY_UUID, 3, h.wrap_nonce, h.wrapped_dek, h.prefix())
    with pytest.raises(HsmKeyMissing):
        hsm.wrap_dek(HSM_KEY_UUID, 3, HSM_DEK, h.prefix())
    with pytest.raises(HsmKeyMissing):
        hsm.unwrap(HSM_KEY_UUID, 99, h.wrap_nonce, h.wrapped_dek, h.prefix())


def golden_envelope(hsm, tmp_path: Path, block_size: int, version: int):
    """An envelope over the golden HSM key, registered as a store's default CMK."""
    from kmsfs.envelope import Envelope
    from kmsfs.keyregistry import KeyRegistry, new_key_record
    from kmsfs.store import store_dir

    store_dir(tmp_path).mkdir()
    registry = KeyRegistry(tmp_path)
    record = new_key_record("golden", "kmsfs")
    record.KeyId = str(HSM_KEY_UUID)

    def add(reg):
        reg.keys[record.KeyId] = record
        reg.default_key = record.KeyId

    registry.update(add)
    return Envelope(hsm, registry, block_size, version), record


def test_envelope_opens_golden_header_and_decrypts_golden_block(hsm, tmp_path: Path):
    """The whole format-1 read path on golden bytes: header -> HSM unwrap -> block."""
    envelope, record = golden_envelope(hsm, tmp_path, B, 1)
    header = envelope.parse(bytes.fromhex(HSM_HEADER_HEX))
    cipher = envelope.open(header)
    assert bytes(cipher.decrypt(bytes.fromhex(BLOCK0_HEX), 0)) == PLAIN
    assert bytes(cipher.decrypt(bytes.fromhex(BLOCK5_HEX), 5)) == PLAIN
    # A fresh file sealed by the envelope is readable by software given the CMK.
    new_header, new_cipher = envelope.seal_new(record, b'{"a":"1"}')
    parsed = parse_header(new_header.to_bytes())
    dek = AESGCM(HSM_CMK).decrypt(parsed.wrap_nonce, parsed.wrapped_dek, parsed.prefix())
    block = bytes(new_cipher.encrypt(b"hello", 0))
    assert AESGCM(dek).decrypt(block[:12], block[12:], parsed.file_id + bytes(8)) == b"hello"


# =========================================================================== format 2
#
# Format 2 is format 1 with one change: block_size_log2 names the ciphertext
# block (2**12 = 4096 bytes on disk, one page), so the plaintext block is
# 4096 - 28 = 4068 bytes.  A kill -9 stops a write between pages, which are
# now block boundaries: no block can be left half old, half new.

G2_HEADER_HEX = (
    "4b4d5346"                                  # magic "KMSF"
    "02"                                        # version 2
    "00"                                        # flags
    "0c"                                        # block_size_log2 = 12: 4096 bytes on disk, 4068 of data
    "00"                                        # reserved
    "000102030405060708090a0b0c0d0e0f"          # file_id
    "101112131415161718191a1b1c1d1e1f"          # key_id
    "00000003"                                  # key_version 3
    "0011"                                      # context_len 17
    "7b2261223a2231222c2262223a2232227d"        # {"a":"1","b":"2"}
    "a0a1a2a3a4a5a6a7a8a9aaab"                  # wrap_nonce
    "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
)
# As computed once by Header.to_bytes() when format 2 was introduced.
G2_HEADER_HEX_COMPUTED = (
    "4b4d534602000c00000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0000000300117b"
    "2261223a2231222c2262223a2232227da0a1a2a3a4a5a6a7a8a9aaabc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2"
    "d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef"
)


def golden_header_v2() -> Header:
    return Header(B2, G_FILE_ID, G_KEY_ID, G_KEY_VERSION, G_CONTEXT, G_NONCE, G_WRAPPED, version=2)


def test_v2_golden_header():
    assert G2_HEADER_HEX == G2_HEADER_HEX_COMPUTED
    assert golden_header_v2().to_bytes().hex() == G2_HEADER_HEX
    h = parse_header(bytes.fromhex(G2_HEADER_HEX))
    assert h == golden_header_v2()
    assert h.version == 2 and h.block_size == 4068
    assert fmt.FORMAT_VERSION == 2 and Header(B2, G_FILE_ID, G_KEY_ID, 1, b"", G_NONCE, G_WRAPPED).version == 2


def test_v1_and_v2_differ_only_in_the_version_byte_and_never_misread():
    v1, v2 = bytes.fromhex(G_HEADER_HEX), bytes.fromhex(G2_HEADER_HEX)
    assert [i for i in range(len(v1)) if v1[i] != v2[i]] == [4]
    # The same block_size_log2 means a different plaintext block in each version,
    # and the version byte is part of the wrap's associated data.
    assert parse_header(v1).block_size == 4096 and parse_header(v2).block_size == 4068
    assert parse_header(v1).prefix() != parse_header(v2).prefix()


# One full format-2 block: 4068 bytes of plaintext fill exactly 4096 bytes.
V2_PLAIN = (bytes(range(256)) * 16)[:B2]
V2_BLOCK1_SHA256 = "f583d28379fd2cdfef7860ee0037d4ea31e6c91f8ee8ca627589ec46ed9a5c52"
V2_BLOCK1_TAG = "261eb5862c6a93f5ce9ca20b6f93dd75"


def test_v2_full_block_is_one_page(monkeypatch):
    import hashlib

    monkeypatch.setattr("kmsfs.contentcrypt.os.urandom", lambda n: (NONCE_B0 * (n // 12))[:n])
    cc = ContentCipher(DEK, FILE_ID0, B2)
    block = bytes(cc.encrypt(V2_PLAIN, 1))
    assert len(block) == 4096 == cc.ct_block_size
    assert block[:12] == NONCE_B0 and block[-16:].hex() == V2_BLOCK1_TAG
    assert hashlib.sha256(block).hexdigest() == V2_BLOCK1_SHA256
    assert block == NONCE_B0 + AESGCM(DEK).encrypt(NONCE_B0, V2_PLAIN, FILE_ID0 + struct.pack(">Q", 1))
    assert bytes(cc.decrypt(block, 1)) == V2_PLAIN
    with pytest.raises(BlockAuthError):
        cc.decrypt(block, 0)
    # Every block of a multi-block run starts on a page boundary.
    run = bytes(cc.encrypt(V2_PLAIN * 3 + b"tail", 0))
    assert len(run) == 3 * 4096 + 4 + BLOCK_OVERHEAD
    assert bytes(cc.decrypt(run[4096:8192], 1)) == V2_PLAIN
    assert bytes(cc.decrypt(run[3 * 4096:], 3)) == b"tail"


V2_SIZE_TABLE = [
    (0, 0),
    (29, 1),
    (4095, B2 - 1),
    (4096, B2),
    (4096 + 29, B2 + 1),
    (2 * 4096, 2 * B2),
    (1000 * 4096, 1000 * B2),
]


@pytest.mark.parametrize("ct,pt", V2_SIZE_TABLE)
def test_v2_size_table(ct, pt):
    assert plaintext_size(ct, B2) == pt
    assert ciphertext_size(pt, B2) == ct
    assert plaintext_size_lenient(ct, B2) == pt


@pytest.mark.parametrize("rest", range(1, BLOCK_OVERHEAD + 1))
def test_v2_invalid_sizes_are_refused(rest):
    with pytest.raises(FormatError, match="not a valid kmsfs size"):
        plaintext_size(4096 * 5 + rest, B2)


@settings(max_examples=200, deadline=None)
@given(plain=st.integers(0, 1 << 40), log2=st.integers(12, 20))
def test_v2_full_blocks_are_exact_powers_of_two(plain, log2):
    bs = fmt.block_size_from_log2(log2, 2)
    ct = ciphertext_size(plain, bs)
    assert plaintext_size(ct, bs) == plain
    # Every block boundary on disk is a multiple of 2**log2 (a page for 4 KiB).
    assert ciphertext_size(plain // bs * bs, bs) % (1 << log2) == 0


# A complete format-2 header for the HSM tests: the wrap's tag differs from the
# format-1 one because the version byte is in its associated data.
HSM_HEADER_V2_HEX = (
    "4b4d534602000c00" + "00" * 16 + "00112233445566778899aabbccddeeff" + "00000001" + "0000"
    + "a0a1a2a3a4a5a6a7a8a9aaab"
    + "d78e043ce6ee9a2a71664bf585b13ef9ff06e7d4f87a933afac5f481f5df60e7"  # wrapped DEK
    + "ed9903961849c5d6e0e8cbe3d2ec591f"                                   # its tag
)


def test_hsm_v2_header_golden_is_software_aesgcm():
    h = parse_header(bytes.fromhex(HSM_HEADER_V2_HEX))
    assert h.version == 2 and h.block_size == B2
    assert AESGCM(HSM_CMK).encrypt(HSM_NONCE, HSM_DEK, h.prefix()) == h.wrapped_dek


def test_hsm_refuses_a_v1_header_relabelled_as_v2(hsm):
    from kmsfs.keystore import HsmUnwrapFailed

    v2 = parse_header(bytes.fromhex(HSM_HEADER_V2_HEX))
    assert hsm.unwrap_dek(HSM_KEY_UUID, 1, v2.wrap_nonce, v2.wrapped_dek, v2.prefix()) == HSM_DEK
    # The format-1 header's wrapped DEK under a format-2 prefix (and the reverse).
    v1 = golden_hsm_header()
    with pytest.raises(HsmUnwrapFailed):
        hsm.unwrap_dek(HSM_KEY_UUID, 1, v1.wrap_nonce, v1.wrapped_dek, v2.prefix())
    with pytest.raises(HsmUnwrapFailed):
        hsm.unwrap_dek(HSM_KEY_UUID, 1, v2.wrap_nonce, v2.wrapped_dek, v1.prefix())


def test_envelope_of_a_v2_store_seals_v2_headers(hsm, tmp_path: Path):
    envelope, record = golden_envelope(hsm, tmp_path, B2, 2)
    header = envelope.parse(bytes.fromhex(HSM_HEADER_V2_HEX))
    assert envelope.open(header).ct_block_size == 4096
    new_header, cipher = envelope.seal_new(record, b"")
    raw = new_header.to_bytes()
    assert raw[4] == 2 and raw[6] == 12
    assert parse_header(raw) == new_header and cipher.block_size == B2
    # A rewrap keeps the header's version and geometry.
    again = envelope.rewrap(parse_header(raw), record)
    assert again.version == 2 and again.block_size == B2
    assert bytes(envelope.open(again).decrypt(cipher.encrypt(b"x" * 5000, 0), 0)) == b"x" * 5000


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.integers(0, 3), min_size=1, max_size=4), tail=st.integers(0, B2 - 1),
       first=st.integers(0, 1000))
def test_encrypt_parts_equals_encrypt_of_the_joined_parts(monkeypatch, blocks, tail, first):
    """The write path passes merged edge blocks and the request's buffer as parts."""
    import random as _random

    rng = _random.Random(sum(blocks) * 7919 + tail)
    parts = [rng.randbytes(n * B2) for n in blocks] + [rng.randbytes(tail)]
    joined = b"".join(parts)
    monkeypatch.setattr("kmsfs.contentcrypt.os.urandom", lambda n: bytes(range(256)) * (n // 256) + bytes(n % 256))
    cc = ContentCipher(DEK, G_FILE_ID, B2)
    assert cc.encrypt_parts([memoryview(p) for p in parts], first) == cc.encrypt(joined, first)
    assert bytes(cc.decrypt(cc.encrypt_parts(parts, first), first)) == joined


def test_encrypt_parts_refuses_a_partial_block_before_the_last_part():
    cc = ContentCipher(DEK, G_FILE_ID, B2)
    with pytest.raises(ValueError, match="only the last part"):
        cc.encrypt_parts([b"x" * 100, b"y" * B2], 0)
