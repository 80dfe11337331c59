"""The decrypt helper process: large cached reads decrypted half by it, half by the loop.

These run the real helper process.  Each test compares with the plaintext
itself or with ContentCipher.decrypt alone, and the tamper cases check
that the block named is the first bad one, in either share.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import backing_path, process_gone, process_state, wait_for
from kmsfs import decrypthelper
from kmsfs.cipherfile import CipherFile
from kmsfs.contentcrypt import BlockAuthError, ContentCipher
from kmsfs.decrypthelper import MIN_BLOCKS, REGION_SIZE, DecryptHelper

BS = 4068
CBS = 4096


@pytest.fixture
def helper() -> Iterator[DecryptHelper]:
    h = DecryptHelper.start()
    try:
        yield h
    finally:
        h.close()
        assert h._process.poll() is not None


@pytest.fixture
def cipher() -> ContentCipher:
    return ContentCipher(os.urandom(32), os.urandom(16), BS)


def _through_helper(helper: DecryptHelper, cipher: ContentCipher, ciphertext: bytes, first_block: int) -> bytes:
    """What the loop does: ciphertext into the region, then decrypt, half in the helper."""
    buffer = helper.ciphertext_buffer(len(ciphertext))
    assert buffer is not None
    buffer[:] = ciphertext
    return bytes(helper.decrypt(cipher, len(ciphertext), first_block))


@pytest.mark.parametrize("nblocks, tail", [(MIN_BLOCKS, 0), (258, 0), (258, 1000), (300, 29), (512, 0)])
@pytest.mark.parametrize("first_block", [0, 7, 1 << 33])
def test_decrypts_what_the_cipher_encrypted(helper: DecryptHelper, cipher: ContentCipher,
                                            nblocks: int, tail: int, first_block: int) -> None:
    plaintext = os.urandom(BS * nblocks + tail)
    ciphertext = bytes(cipher.encrypt(plaintext, first_block))
    assert _through_helper(helper, cipher, ciphertext, first_block) == plaintext
    assert helper.shared_reads == 1
    assert helper.failures == 0


def test_small_reads_are_not_shared(helper: DecryptHelper, cipher: ContentCipher) -> None:
    plaintext = os.urandom(BS * (MIN_BLOCKS - 1))
    assert _through_helper(helper, cipher, bytes(cipher.encrypt(plaintext, 3)), 3) == plaintext
    assert helper.shared_reads == 0


def test_holes_are_zeros_though_the_region_held_data(helper: DecryptHelper, cipher: ContentCipher) -> None:
    plaintext = os.urandom(BS * 256)
    ciphertext = bytearray(cipher.encrypt(plaintext, 0))
    assert _through_helper(helper, cipher, bytes(ciphertext), 0) == plaintext  # the region now holds data
    holes = (1, 100, 200, 255)  # in the loop's share and in the helper's
    expected = bytearray(plaintext)
    for i in holes:
        ciphertext[i * CBS:(i + 1) * CBS] = bytes(CBS)
        expected[i * BS:(i + 1) * BS] = bytes(BS)
    assert _through_helper(helper, cipher, bytes(ciphertext), 0) == bytes(expected)
    assert _through_helper(helper, cipher, bytes(ciphertext), 0) == bytes(cipher.decrypt(ciphertext, 0))


@pytest.mark.parametrize("bad", [0, 50, 95, 96, 97, 200, 255])
@pytest.mark.parametrize("how", ["flip", "swap", "foreign"])
def test_a_tampered_block_is_named_in_either_share(helper: DecryptHelper, cipher: ContentCipher,
                                                   bad: int, how: str) -> None:
    plaintext = os.urandom(BS * 256)
    ciphertext = bytearray(cipher.encrypt(plaintext, 10))
    if how == "flip":
        ciphertext[bad * CBS + 40] ^= 0x01
    elif how == "swap":  # another block of the same file, moved here
        other = (bad + 1) % 256
        ciphertext[bad * CBS:(bad + 1) * CBS] = ciphertext[other * CBS:(other + 1) * CBS]
    else:  # the same block of another file under the same DEK (file ids differ)
        other_file = ContentCipher(cipher.key_for_decrypt_helper(), os.urandom(16), BS)
        ciphertext[bad * CBS:(bad + 1) * CBS] = other_file.encrypt(os.urandom(BS), 10 + bad)
    with pytest.raises(BlockAuthError) as info:
        _through_helper(helper, cipher, bytes(ciphertext), 10)
    assert info.value.block_number == 10 + bad
    # Still in step: the next read is right.
    assert _through_helper(helper, cipher, bytes(cipher.encrypt(plaintext, 10)), 10) == plaintext
    assert helper.failures == 0


def test_the_first_bad_block_is_named_when_both_shares_have_one(helper: DecryptHelper,
                                                                cipher: ContentCipher) -> None:
    ciphertext = bytearray(cipher.encrypt(os.urandom(BS * 256), 0))
    ciphertext[20 * CBS + 40] ^= 1
    ciphertext[230 * CBS + 40] ^= 1
    with pytest.raises(BlockAuthError) as info:
        _through_helper(helper, cipher, bytes(ciphertext), 0)
    assert info.value.block_number == 20


def test_a_truncated_last_block_is_refused(helper: DecryptHelper, cipher: ContentCipher) -> None:
    ciphertext = bytes(cipher.encrypt(os.urandom(BS * 256), 0)) + bytes(20)
    with pytest.raises(BlockAuthError) as info:
        _through_helper(helper, cipher, ciphertext, 0)
    assert info.value.block_number == 256
    assert helper.failures == 0  # damage, not a reason to give the helper up
    assert helper.stats()["helper_pid"] == helper.pid


def test_reads_go_on_when_the_helper_dies(helper: DecryptHelper, cipher: ContentCipher,
                                          caplog: pytest.LogCaptureFixture) -> None:
    plaintext = os.urandom(BS * 256)
    ciphertext = bytes(cipher.encrypt(plaintext, 0))
    assert _through_helper(helper, cipher, ciphertext, 0) == plaintext
    helper._process.kill()
    helper._process.wait()
    with caplog.at_level(logging.WARNING, logger="kmsfs.decrypthelper"):
        assert _through_helper(helper, cipher, ciphertext, 0) == plaintext
    assert helper.failures == 1
    assert helper.stats()["helper_pid"] is None
    assert "decrypts on its own from now on" in caplog.text
    assert helper.ciphertext_buffer(len(ciphertext)) is None  # callers use their own buffers now


def test_a_helper_that_does_not_answer_is_given_up(cipher: ContentCipher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decrypthelper, "ANSWER_TIMEOUT", 0.3)
    h = DecryptHelper.start()
    try:
        os.kill(h.pid, signal.SIGSTOP)  # alive, but silent
        assert wait_for(lambda: process_state(h.pid) == "T")  # stopped for sure: delivery follows kill(2)
        plaintext = os.urandom(BS * 128)
        assert _through_helper(h, cipher, bytes(cipher.encrypt(plaintext, 0)), 0) == plaintext
        assert h.failures == 1
        assert h._process.poll() is not None  # killed, so it cannot write the region later
    finally:
        h.close()


def test_helper_refuses_malformed_requests() -> None:
    region = memoryview(bytearray(2 * REGION_SIZE))
    good = dict(dek=os.urandom(32), file_id=os.urandom(16), cbs=CBS, first=0, ct_offset=0,
                ct_length=CBS, pt_offset=REGION_SIZE)
    for change in [dict(cbs=28), dict(ct_length=0), dict(ct_offset=REGION_SIZE - 100),
                   dict(pt_offset=0), dict(pt_offset=2 * REGION_SIZE - 100), dict(ct_length=CBS + 10)]:
        fields = {**good, **change}
        request = decrypthelper._REQUEST.pack(*fields.values())
        assert decrypthelper._answer_for(request, region) == decrypthelper._MALFORMED, change


def test_helper_ends_when_the_daemon_closes_its_end() -> None:
    h = DecryptHelper.start()
    h.close()
    assert h._process.returncode == 0
    h.close()  # twice is harmless


def test_not_used_from_another_thread(helper: DecryptHelper) -> None:
    import threading
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(helper.ciphertext_buffer(CBS * 100)))
    t.start()
    t.join()
    assert got == [None]


def test_cipherfile_reads_through_the_helper(helper: DecryptHelper, cipher: ContentCipher, tmp_path: Path) -> None:
    plaintext = os.urandom(BS * 600 + 123)
    path = tmp_path / "f"
    path.write_bytes(cipher.encrypt(plaintext, 0))
    fd = os.open(path, os.O_RDWR)
    try:
        file = CipherFile(fd, cipher, decrypt_helper=helper)
        for offset, length in [(0, 1 << 20), (BS * 3 + 11, 1 << 20), (len(plaintext) - 300_000, 1 << 20),
                               (100, 4096)]:
            assert bytes(file.read(offset, length, nowait=True)) == plaintext[offset:offset + length]
        assert helper.shared_reads == 3
        tampered = bytearray(path.read_bytes())
        tampered[150 * CBS + 100] ^= 0x80
        os.pwrite(fd, tampered, 0)
        with pytest.raises(BlockAuthError) as info:
            file.read(0, 1 << 20, nowait=True)
        assert info.value.block_number == 150
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- through a mount

def _helper_status(m) -> dict | None:
    return json.loads((m.path / ".kmsfs" / "status").read_bytes())["decrypt_helper"]


def test_large_reads_through_a_mount_share_the_decryption(store) -> None:
    """Root sets the mount's readahead to 1 MiB, so that sequential reads arrive as
    requests large enough to share (as in CI); other users get 128 KiB requests,
    which the loop decrypts alone, so only the bytes can be checked then."""
    m = store.mount()
    helper = _helper_status(m)
    if len(os.sched_getaffinity(0)) < 2:
        assert helper is None and "decrypt helper off: only one CPU" in m.log()
        return
    assert helper is not None and helper["failures"] == 0
    pid = helper["helper_pid"]
    data = os.urandom(4 << 20)
    other = os.urandom(3 << 20)
    (m.path / "big").write_bytes(data)
    (m.path / "other").write_bytes(other)
    m.unmount()
    assert not os.path.exists(f"/proc/{pid}"), "the helper outlived its daemon"
    assert re.search(r"decrypt helper: shared \d+ reads, failed 0", m.log()), m.log()

    m = store.mount()  # the kernel's cache of the plaintext is gone; the backing file's is not
    assert (m.path / "big").read_bytes() == data
    if os.geteuid() == 0:
        assert _helper_status(m)["shared_reads"] > 0
    # A block in the helper's share of the third 1 MiB request (blocks 515 to 773; the
    # helper decrypts those from 613 on).
    backing = backing_path(m, "big")
    with open(backing, "r+b") as fh:
        fh.seek(700 * CBS + 500)
        byte = fh.read(1)
        fh.seek(700 * CBS + 500)
        fh.write(bytes([byte[0] ^ 0x10]))
    m.unmount()
    m = store.mount()
    with open(m.path / "big", "rb") as fh:
        assert fh.read(2 << 20) == data[:2 << 20]
        with pytest.raises(OSError) as info:
            fh.read(1 << 20)
        assert info.value.errno == errno.EIO
    assert "block 700: authentication failed" in m.log()
    assert (m.path / "other").read_bytes() == other  # still in step
    assert _helper_status(m)["failures"] == 0
    m.unmount()


def test_the_helper_can_be_turned_off(store) -> None:
    m = store.mount(None, "decrypt_helper=0")
    assert _helper_status(m) is None
    assert "decrypt helper off (-o decrypt_helper=0)" in m.log()
    data = os.urandom(2 << 20)
    (m.path / "f").write_bytes(data)
    assert (m.path / "f").read_bytes() == data
    m.unmount()


def test_the_helper_ends_when_its_daemon_is_killed(store) -> None:
    m = store.mount()
    helper = _helper_status(m)
    if helper is None:  # one CPU: no helper to end (see the test above)
        assert len(os.sched_getaffinity(0)) < 2, m.log()
        m.unmount()
        return
    pid = helper["helper_pid"]
    data = os.urandom(2 << 20)
    (m.path / "f").write_bytes(data)
    m.kill9()
    assert wait_for(lambda: process_gone(pid)), "the decrypt helper outlived its killed daemon"
    m = store.mount()  # and the store is fine
    assert (m.path / "f").read_bytes() == data
    m.unmount()

