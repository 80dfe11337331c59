"""Refusals of the key lifecycle, through a real mount.

Every writable control file is fed malformed and out-of-range commands: each
must fail with the right errno, change nothing (every key's info, grants,
rotation, deletion and the default key compared before and after) and leave
an audit line that gives the reason.  Then the same for a second uid without
the grants a command needs, and finally rotate, rewrap and disable while
other processes read and write files under the key.

Most tests share one mount (module scope): a refusal changes nothing, so they
cannot disturb each other; tests that change state restore it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Mount, Store, make_store, status_state
from test_lifecycle import (
    OTHER_UID, as_user, audit, audit_since, b64, cli, create_key, ctl, errno_of, info, key_dir, key_of, kpath,
    open_mountpoint, read_ctl, require_other_uid, transact, wait_rewrap, write_ctl, _wrap,
)

pytestmark = pytest.mark.mount


@dataclass
class Env:
    store: Store
    m: Mount
    victim: dict[str, Any]
    blob: str  # under victim, no context
    ctx_blob: str  # under victim, context CTX
    file: Path  # under victim, mode 0666 in a 0777 directory
    dir: Path


CTX = '{"purpose": "tests"}'
FILE_DATA = b"victim data " * 1000


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    store = make_store(tmp_path_factory.mktemp("lifecycle-errors") / "s")
    with open_mountpoint() as mnt:
        m = store.mount(mnt, "allow_other")
        try:
            victim = create_key(m, "victim")
            write_ctl(kpath(m, "victim", "description"), "the key under test")
            write_ctl(kpath(m, "victim", "rotation"), "90")
            d = key_dir(m, "vdir", "victim", mode=0o777)
            f = d / "file"
            f.write_bytes(FILE_DATA)
            os.chmod(f, 0o666)
            blob = transact(kpath(m, "victim", "encrypt"), {"Plaintext": b64(b"victim secret")})["CiphertextBlob"]
            ctx_blob = transact(kpath(m, "victim", "encrypt"),
                                {"Plaintext": b64(b"with context"), "EncryptionContext": CTX})["CiphertextBlob"]
            create_key(m, "off")
            write_ctl(kpath(m, "off", "state"), "Disabled")
            create_key(m, "doomed")
            write_ctl(kpath(m, "doomed", "deletion"), "20")
            transact(ctl(m) / "create-key", {"Alias": "ext", "Origin": "EXTERNAL"})
            kpath(m, "ext", "import/wrapping-key.pem").read_bytes()  # the import key pair exists
            yield Env(store, m, victim, blob, ctx_blob, f, d)
        finally:
            for mount in store.mounts:
                mount.cleanup()


def snapshot(m: Mount) -> dict[str, Any]:
    """Everything a refusal must leave as it was."""
    keys = {}
    for alias in sorted(os.listdir(ctl(m) / "keys")):
        keys[alias] = {leaf: read_ctl(kpath(m, alias, leaf))
                       for leaf in ("info", "state", "description", "rotation", "deletion", "grants")}
    return {"keys": keys, "default": read_ctl(ctl(m) / "default-key"),
            "status": status_state((ctl(m) / "status").read_bytes())}


def check_refused(env: Env, action: Callable[[], int | None], code: int, word: str | None = "",
                  uid: int | None = None) -> None:
    """``action`` fails with ``code``, changes nothing, and (unless word is None) is audited."""
    before = snapshot(env.m)
    count = len(audit(env.m))
    assert action() == code
    assert snapshot(env.m) == before
    if word is None:
        return
    lines = [e for e in audit_since(env.m, count) if e["result"] in ("refused", "denied", "failed")]
    assert lines, "no audit line for the refusal"
    assert all(e["reason"] for e in lines), lines
    if uid is not None:
        assert all(e["uid"] == uid for e in lines), lines
    assert any(word.lower() in e["reason"].lower() for e in lines), (word, lines)
    for entry in lines:
        assert {"time", "uid", "operation", "key", "result", "reason"} <= set(entry)


def write_errno(path: Path, data: bytes) -> int | None:
    return errno_of(write_ctl, path, data)


def txn_errno(path: Path, raw: bytes) -> int | None:
    """The errno of a transaction, whether the write or the read of the answer refuses it."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, raw)
        except OSError as exc:
            return exc.errno
        try:
            os.read(fd, 65536)
        except OSError as exc:
            return exc.errno
        return None
    finally:
        os.close(fd)


# ====================================================================== control file writes

EINVAL, EPERM, EACCES = errno.EINVAL, errno.EPERM, errno.EACCES
NOT_UTF8 = b"\xff\xfe\xc3\x28"

BAD_WRITES = [
    # state
    ("keys/victim/state", b"enabled", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", b"DISABLED\n", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", b"PendingDelete", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", b"PendingImport", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", b"Enabled\nDisabled\n", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", b"\n", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", b"   ", EINVAL, "Enabled or Disabled"),
    ("keys/victim/state", NOT_UTF8, EINVAL, "UTF-8"),
    ("keys/ext/state", b"Enabled", EPERM, "import"),
    ("keys/doomed/state", b"Enabled", EPERM, "pending deletion"),
    ("keys/doomed/state", b"Disabled", EPERM, "pending deletion"),
    ("keys/kmsfs-default/state", b"Disabled", EPERM, "filesystem-managed"),
    # description
    ("keys/victim/description", b"x" * 1025, EINVAL, "1024"),
    ("keys/victim/description", "é".encode() * 513, EINVAL, "1024"),
    ("keys/victim/description", NOT_UTF8, EINVAL, "UTF-8"),
    # rotate
    ("keys/victim/rotate", NOT_UTF8, EINVAL, "UTF-8"),
    ("keys/ext/rotate", b"1", EPERM, "PendingImport"),
    ("keys/doomed/rotate", b"1", EPERM, "PendingDelete"),
    # rotation
    ("keys/victim/rotation", b"6", EINVAL, "7 to 365"),
    ("keys/victim/rotation", b"366", EINVAL, "7 to 365"),
    ("keys/victim/rotation", b"0", EINVAL, "7 to 365"),
    ("keys/victim/rotation", b"-7", EINVAL, "7-365"),
    ("keys/victim/rotation", b"7.5", EINVAL, "7-365"),
    ("keys/victim/rotation", b"30 days", EINVAL, "7-365"),
    ("keys/victim/rotation", b"abc", EINVAL, "7-365"),
    ("keys/victim/rotation", b"OFF", EINVAL, "7-365"),
    ("keys/victim/rotation", b"1e3", EINVAL, "7-365"),
    ("keys/victim/rotation", b"99999999999999999999", EINVAL, "7-365"),
    ("keys/victim/rotation", b"\n", EINVAL, "7-365"),
    ("keys/victim/rotation", NOT_UTF8, EINVAL, "UTF-8"),
    ("keys/ext/rotation", b"30", EPERM, "imported keys"),
    # deletion
    ("keys/victim/deletion", b"6", EINVAL, "7 to 30"),
    ("keys/victim/deletion", b"31", EINVAL, "7 to 30"),
    ("keys/victim/deletion", b"0", EINVAL, "7 to 30"),
    ("keys/victim/deletion", b"-7", EINVAL, "7-30"),
    ("keys/victim/deletion", b"abc", EINVAL, "7-30"),
    ("keys/victim/deletion", b"CANCEL", EINVAL, "7-30"),
    ("keys/victim/deletion", b"7 days", EINVAL, "7-30"),
    ("keys/victim/deletion", b"\n", EINVAL, "7-30"),
    ("keys/victim/deletion", NOT_UTF8, EINVAL, "UTF-8"),
    ("keys/victim/deletion", b"cancel", EINVAL, "no deletion is scheduled"),
    ("keys/doomed/deletion", b"7", EINVAL, "already scheduled"),
    ("keys/kmsfs-default/deletion", b"7", EPERM, "filesystem-managed"),
    # rewrap
    ("keys/victim/rewrap", b"stop", EINVAL, "write start"),
    ("keys/victim/rewrap", b"START", EINVAL, "write start"),
    ("keys/victim/rewrap", b"\n", EINVAL, "write start"),
    ("keys/victim/rewrap", NOT_UTF8, EINVAL, "UTF-8"),
    # grants
    ("keys/victim/grants", b"uid:1234\n", EINVAL, "line 1"),
    ("keys/victim/grants", b"uid:1234 use extra\n", EINVAL, "line 1"),
    ("keys/victim/grants", b"uid:abc use\n", EINVAL, "uid:N"),
    ("keys/victim/grants", b"uid: use\n", EINVAL, "uid:N"),
    ("keys/victim/grants", b"uid:-1 use\n", EINVAL, "uid:N"),
    ("keys/victim/grants", b"uid:4294967296 use\n", EINVAL, "uid:N"),
    ("keys/victim/grants", b"user:1234 use\n", EINVAL, "uid:N"),
    ("keys/victim/grants", b"1234 use\n", EINVAL, "uid:N"),
    ("keys/victim/grants", b"uid:1234 owner\n", EINVAL, "role"),
    ("keys/victim/grants", b"uid:1234 USE\n", EINVAL, "role"),
    ("keys/victim/grants", b"gid:10 read\n", EINVAL, "role"),
    ("keys/victim/grants", b"uid:1234 use\nuid:5 bogus\n", EINVAL, "line 2"),
    ("keys/victim/grants", NOT_UTF8, EINVAL, "UTF-8"),
    # default-key
    ("default-key", b"no-such-key", EINVAL, "no CMK"),
    ("default-key", b"00000000-0000-0000-0000-000000000000", EINVAL, "no CMK"),
    ("default-key", b"\n", EINVAL, "no CMK"),
    ("default-key", NOT_UTF8, EINVAL, "UTF-8"),
    ("default-key", b"off", EINVAL, "must be Enabled"),
    ("default-key", b"ext", EINVAL, "must be Enabled"),
    ("default-key", b"doomed", EINVAL, "must be Enabled"),
    # import material
    ("keys/victim/import/material", b"x" * 384, EPERM, "Origin EXTERNAL"),
    ("keys/ext/import/material", b"not wrapped key material", EINVAL, "could not import"),
    ("keys/ext/import/material", b"\0" * 384, EINVAL, "could not import"),
]


@pytest.mark.parametrize("rel, data, code, word", BAD_WRITES,
                         ids=[f"{r}={d[:12]!r}" for r, d, _, _ in BAD_WRITES])
def test_bad_control_writes_are_refused_change_nothing_and_are_audited(env, rel, data, code, word):
    check_refused(env, lambda: write_errno(ctl(env.m) / rel, data), code, word)


def test_an_incomplete_write_sequence_cannot_change_state_half_way(env):
    """One write is one command: a second write is a new command, not a continuation."""
    before = info(env.m, "victim")
    fd = os.open(kpath(env.m, "victim", "rotation"), os.O_WRONLY)
    try:
        assert errno_of(os.write, fd, b"3") == EINVAL
        assert errno_of(os.write, fd, b"0") == EINVAL  # not "30"
    finally:
        os.close(fd)
    assert info(env.m, "victim") == before
    # O_TRUNC without a write (": > file") is no command at all.
    os.close(os.open(kpath(env.m, "victim", "state"), os.O_WRONLY | os.O_TRUNC))
    os.close(os.open(kpath(env.m, "victim", "description"), os.O_WRONLY | os.O_TRUNC))
    assert info(env.m, "victim") == before


def test_the_default_key_for_new_files_cannot_be_disabled_or_deleted(env):
    m = env.m
    write_ctl(ctl(m) / "default-key", "victim")
    try:
        check_refused(env, lambda: write_errno(kpath(m, "victim", "state"), b"Disabled"), EPERM, "default key")
        check_refused(env, lambda: write_errno(kpath(m, "victim", "deletion"), b"7"), EPERM, "default key")
    finally:
        write_ctl(ctl(m) / "default-key", "kmsfs-default")


def test_rewrap_while_a_rewrap_runs_is_busy(env):
    m = env.m
    create_key(m, "busy")
    d = key_dir(m, "busydir", "busy")
    for i in range(400):
        (d / f"f{i}").write_bytes(b"x")
    write_ctl(kpath(m, "busy", "rotate"), "1")
    write_ctl(kpath(m, "busy", "rewrap"), "start")
    count = len(audit(m))
    code = write_errno(kpath(m, "busy", "rewrap"), b"start")
    progress = wait_rewrap(m, "busy")
    assert progress["state"] == "done" and progress["done"] == 400
    if code is None:
        pytest.skip("the rewrap of 400 files finished before a second start could be written")
    assert code == errno.EBUSY
    [line] = [e for e in audit_since(m, count) if e["operation"] == "Rewrap"]
    assert line["result"] == "refused" and "running" in line["reason"]


def test_importing_material_twice_is_refused(env):
    m = env.m
    transact(ctl(m) / "create-key", {"Alias": "byok-once", "Origin": "EXTERNAL"})
    pem = kpath(m, "byok-once", "import/wrapping-key.pem").read_bytes()
    write_ctl(kpath(m, "byok-once", "import/material"), _wrap(pem, os.urandom(32), "sha1"))
    assert info(m, "byok-once")["KeyState"] == "Enabled"
    again = _wrap(pem, os.urandom(32), "sha1")
    check_refused(env, lambda: write_errno(kpath(m, "byok-once", "import/material"), again), EPERM, "only be imported once")
    # Imported keys rotate by import only.
    check_refused(env, lambda: write_errno(kpath(m, "byok-once", "rotate"), b"1"), EPERM, "imported keys")


def test_wrapping_key_of_a_kmsfs_key_is_refused(env):
    check_refused(env, lambda: errno_of(kpath(env.m, "victim", "import/wrapping-key.pem").read_bytes),
                  EPERM, "Origin EXTERNAL")


# ---------------------------------------------------------------------- read-only files


@pytest.mark.parametrize("rel", ["README", "status", "audit.log", "keys/victim/info",
                                 "keys/ext/import/wrapping-key.pem"])
@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
def test_read_only_control_files_refuse_writing(env, rel, flags):
    path = ctl(env.m) / rel
    content = status_state if rel == "status" else (lambda raw: raw)
    before = content(path.read_bytes()) if rel != "audit.log" else None
    check_refused(env, lambda: errno_of(os.open, path, flags), EACCES, "read-only")
    if before is not None:
        assert content(path.read_bytes()) == before


# ---------------------------------------------------------------------- transactional files


def _blob(env: Env, mutate: Callable[[bytes], bytes] = lambda b: b) -> str:
    return b64(mutate(base64.b64decode(env.ctx_blob)))


def _flip(raw: bytes, index: int) -> bytes:
    out = bytearray(raw)
    out[index] ^= 1
    return bytes(out)


BAD_REQUESTS: list[tuple[str, str, Callable[[Env], bytes], int, str]] = [
    # (id, file, request, errno, reason word)
    ("enc-not-json", "keys/victim/encrypt", lambda e: b"{", EINVAL, "JSON"),
    ("enc-garbage", "keys/victim/encrypt", lambda e: b"Plaintext=aGk=", EINVAL, "JSON"),
    ("enc-not-utf8", "keys/victim/encrypt", lambda e: NOT_UTF8, EINVAL, "JSON"),
    ("enc-array", "keys/victim/encrypt", lambda e: b"[1, 2]", EINVAL, "JSON object"),
    ("enc-string", "keys/victim/encrypt", lambda e: b'"aGk="', EINVAL, "JSON object"),
    ("enc-null", "keys/victim/encrypt", lambda e: b"null", EINVAL, "JSON object"),
    ("enc-missing", "keys/victim/encrypt", lambda e: b"{}", EINVAL, "Plaintext"),
    ("enc-number", "keys/victim/encrypt", lambda e: b'{"Plaintext": 5}', EINVAL, "Plaintext"),
    ("enc-not-b64", "keys/victim/encrypt", lambda e: b'{"Plaintext": "not base64!"}', EINVAL, "base64"),
    ("enc-b64-pad", "keys/victim/encrypt", lambda e: b'{"Plaintext": "aGk"}', EINVAL, "base64"),
    ("enc-4097", "keys/victim/encrypt",
     lambda e: json.dumps({"Plaintext": b64(b"x" * 4097)}).encode(), EINVAL, "4096"),
    ("enc-ctx-1025", "keys/victim/encrypt",
     lambda e: json.dumps({"Plaintext": "aGk=", "EncryptionContext": json.dumps({"k": "v" * 1016})}).encode(),
     EINVAL, "1024"),
    ("enc-ctx-object", "keys/victim/encrypt",
     lambda e: json.dumps({"Plaintext": "aGk=", "EncryptionContext": {"k": "v"}}).encode(), EINVAL, "JSON string"),
    ("enc-ctx-not-json", "keys/victim/encrypt",
     lambda e: json.dumps({"Plaintext": "aGk=", "EncryptionContext": "k=v"}).encode(), EINVAL, "not valid JSON"),
    ("enc-ctx-number-value", "keys/victim/encrypt",
     lambda e: json.dumps({"Plaintext": "aGk=", "EncryptionContext": '{"k": 1}'}).encode(), EINVAL, "string values"),
    ("enc-ctx-array", "keys/victim/encrypt",
     lambda e: json.dumps({"Plaintext": "aGk=", "EncryptionContext": '["k"]'}).encode(), EINVAL, "JSON object"),
    ("enc-disabled", "keys/off/encrypt", lambda e: b'{"Plaintext": "aGk="}', EACCES, "Disabled"),
    ("enc-pending-delete", "keys/doomed/encrypt", lambda e: b'{"Plaintext": "aGk="}', EACCES, "PendingDelete"),
    ("enc-pending-import", "keys/ext/encrypt", lambda e: b'{"Plaintext": "aGk="}', EACCES, "PendingImport"),
    ("gdk-spec", "keys/victim/generate-data-key", lambda e: b'{"KeySpec": "AES_512"}', EINVAL, "KeySpec"),
    ("gdk-spec-number", "keys/victim/generate-data-key", lambda e: b'{"KeySpec": 256}', EINVAL, "KeySpec"),
    ("gdk-bytes-0", "keys/victim/generate-data-key", lambda e: b'{"NumberOfBytes": 0}', EINVAL, "NumberOfBytes"),
    ("gdk-bytes-1025", "keys/victim/generate-data-key", lambda e: b'{"NumberOfBytes": 1025}', EINVAL,
     "NumberOfBytes"),
    ("gdk-bytes-text", "keys/victim/generate-data-key", lambda e: b'{"NumberOfBytes": "32"}', EINVAL,
     "NumberOfBytes"),
    ("gdk-ctx-1025", "keys/victim/generate-data-key",
     lambda e: json.dumps({"EncryptionContext": json.dumps({"k": "v" * 1016})}).encode(), EINVAL, "1024"),
    ("gdk-not-json", "keys/victim/generate-data-key", lambda e: b"{KeySpec}", EINVAL, "JSON"),
    ("gdk-disabled", "keys/off/generate-data-key", lambda e: b"{}", EACCES, "Disabled"),
    ("dec-missing", "decrypt", lambda e: b"{}", EINVAL, "CiphertextBlob"),
    ("dec-not-json", "decrypt", lambda e: b"{'CiphertextBlob': 1}", EINVAL, "JSON"),
    ("dec-not-b64", "decrypt", lambda e: b'{"CiphertextBlob": "%%%"}', EINVAL, "base64"),
    ("dec-short", "decrypt", lambda e: b'{"CiphertextBlob": "AAAA"}', EINVAL, "too short"),
    ("dec-foreign", "decrypt", lambda e: json.dumps({"CiphertextBlob": b64(os.urandom(80))}).encode(), EINVAL,
     "not a kmsfs ciphertext"),
    ("dec-unknown-key", "decrypt",
     lambda e: json.dumps({"CiphertextBlob": _blob(e, lambda b: b[:5] + bytes(16) + b[21:]),
                           "EncryptionContext": CTX}).encode(), EINVAL, "no CMK"),
    ("dec-unknown-version", "decrypt",
     lambda e: json.dumps({"CiphertextBlob": _blob(e, lambda b: b[:21] + b"\0\0\0\x09" + b[25:]),
                           "EncryptionContext": CTX}).encode(), EINVAL, "version 9"),
    ("dec-tampered", "decrypt",
     lambda e: json.dumps({"CiphertextBlob": _blob(e, lambda b: _flip(b, len(b) - 1)),
                           "EncryptionContext": CTX}).encode(), EINVAL, "could not unwrap"),
    ("dec-no-context", "decrypt", lambda e: json.dumps({"CiphertextBlob": e.ctx_blob}).encode(), EINVAL,
     "could not unwrap"),
    ("dec-wrong-context", "decrypt",
     lambda e: json.dumps({"CiphertextBlob": e.ctx_blob, "EncryptionContext": '{"purpose": "other"}'}).encode(),
     EINVAL, "could not unwrap"),
    ("dec-context-for-none", "decrypt",
     lambda e: json.dumps({"CiphertextBlob": e.blob, "EncryptionContext": CTX}).encode(), EINVAL,
     "could not unwrap"),
    ("dec-ctx-1025", "decrypt",
     lambda e: json.dumps({"CiphertextBlob": e.blob, "EncryptionContext": json.dumps({"k": "v" * 1016})}).encode(),
     EINVAL, "1024"),
    ("reenc-no-destination", "reencrypt", lambda e: json.dumps({"CiphertextBlob": e.blob}).encode(), EINVAL,
     "DestinationKeyId"),
    ("reenc-destination-number", "reencrypt",
     lambda e: json.dumps({"CiphertextBlob": e.blob, "DestinationKeyId": 7}).encode(), EINVAL, "DestinationKeyId"),
    ("reenc-unknown-destination", "reencrypt",
     lambda e: json.dumps({"CiphertextBlob": e.blob, "DestinationKeyId": "nope"}).encode(), EINVAL, "no CMK"),
    ("reenc-disabled-destination", "reencrypt",
     lambda e: json.dumps({"CiphertextBlob": e.blob, "DestinationKeyId": "off"}).encode(), EACCES, "Disabled"),
    ("reenc-wrong-source-context", "reencrypt",
     lambda e: json.dumps({"CiphertextBlob": e.ctx_blob, "DestinationKeyId": "kmsfs-default",
                           "SourceEncryptionContext": '{"x": "y"}'}).encode(), EINVAL, "could not unwrap"),
    ("create-missing-alias", "create-key", lambda e: b"{}", EINVAL, "Alias"),
    ("create-alias-number", "create-key", lambda e: b'{"Alias": 5}', EINVAL, "Alias"),
    ("create-bad-alias", "create-key", lambda e: b'{"Alias": "bad alias"}', EINVAL, "alias"),
    ("create-dot-alias", "create-key", lambda e: b'{"Alias": ".hidden"}', EINVAL, "alias"),
    ("create-long-alias", "create-key", lambda e: json.dumps({"Alias": "a" * 61}).encode(), EINVAL, "60"),
    ("create-duplicate", "create-key", lambda e: b'{"Alias": "victim"}', errno.EEXIST, "exists already"),
    ("create-origin", "create-key", lambda e: b'{"Alias": "n", "Origin": "AWS_KMS"}', EINVAL, "Origin"),
    ("create-description", "create-key", lambda e: json.dumps({"Alias": "n", "Description": "x" * 1025}).encode(),
     EINVAL, "1024"),
    ("create-description-type", "create-key", lambda e: b'{"Alias": "n", "Description": ["x"]}', EINVAL,
     "Description"),
]


@pytest.mark.parametrize("rel, request_of, code, word", [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_transactions_are_refused_change_nothing_and_are_audited(env, rel, request_of, code, word):
    raw = request_of(env)
    check_refused(env, lambda: txn_errno(ctl(env.m) / rel, raw), code, word)


def test_a_refused_request_leaves_the_open_file_usable_for_the_next(env):
    fd = os.open(kpath(env.m, "victim", "encrypt"), os.O_RDWR)
    try:
        assert errno_of(os.write, fd, b'{"Plaintext": "!!"}') == EINVAL
        os.write(fd, json.dumps({"Plaintext": b64(b"ok now")}).encode())
        answer = json.loads(os.read(fd, 65536))
    finally:
        os.close(fd)
    back = transact(ctl(env.m) / "decrypt", {"CiphertextBlob": answer["CiphertextBlob"]})
    assert base64.b64decode(back["Plaintext"]) == b"ok now"


# ---------------------------------------------------------------------- directories


def _mkdir(env: Env, rel: str) -> Callable[[], int | None]:
    return lambda: errno_of(os.mkdir, ctl(env.m) / rel)


def _rename(env: Env, old: str, new: str) -> Callable[[], int | None]:
    def go() -> int | None:
        resolve = lambda p: env.m.path / p[1:] if p.startswith("/") else ctl(env.m) / p  # noqa: E731
        return errno_of(os.rename, resolve(old), resolve(new))
    return go


STRUCTURE: list[tuple[str, Callable[[Env], Callable[[], int | None]], int, str | None]] = [
    # (id, action, errno, audit reason word or None when the kernel answers alone)
    ("mkdir-dot-alias", lambda e: _mkdir(e, "keys/.hidden"), EINVAL, "alias"),
    ("mkdir-space", lambda e: _mkdir(e, "keys/bad name"), EINVAL, "alias"),
    ("mkdir-colon", lambda e: _mkdir(e, "keys/a:b"), EINVAL, "alias"),
    ("mkdir-long", lambda e: _mkdir(e, "keys/" + "a" * 61), EINVAL, "60"),
    ("mkdir-non-ascii", lambda e: _mkdir(e, "keys/schlüssel"), EINVAL, "alias"),
    # An existing name: the kernel's own lookup answers EEXIST before kmsfs is asked.
    ("mkdir-duplicate", lambda e: _mkdir(e, "keys/victim"), errno.EEXIST, None),
    ("mkdir-top", lambda e: _mkdir(e, "newdir"), EPERM, "keys/"),
    ("mkdir-in-key", lambda e: _mkdir(e, "keys/victim/sub"), EPERM, "keys/"),
    ("mkdir-in-import", lambda e: _mkdir(e, "keys/victim/import/sub"), EPERM, "keys/"),
    ("mv-duplicate", lambda e: _rename(e, "keys/victim", "keys/off"), errno.EEXIST, "exists already"),
    ("mv-to-default", lambda e: _rename(e, "keys/victim", "keys/kmsfs-default"), errno.EEXIST, "exists already"),
    ("mv-bad-alias", lambda e: _rename(e, "keys/victim", "keys/.x"), EINVAL, "alias"),
    ("mv-long-alias", lambda e: _rename(e, "keys/victim", "keys/" + "b" * 61), EINVAL, "60"),
    ("mv-out-of-keys", lambda e: _rename(e, "keys/victim", "victim"), EPERM, "keys/"),
    ("mv-control-file", lambda e: _rename(e, "keys/victim/info", "keys/victim/info2"), EPERM, "keys/"),
    ("mv-top-file", lambda e: _rename(e, "status", "status2"), EPERM, "keys/"),
    ("mv-to-plain-tree", lambda e: _rename(e, "keys/victim", "/stolen"), errno.EXDEV, None),
    ("mv-from-plain-tree", lambda e: _rename(e, "/vdir", "keys/vdir"), errno.EXDEV, None),
    ("rmdir-key", lambda e: lambda: errno_of(os.rmdir, kpath(e.m, "victim")), EPERM, None),
    ("rmdir-keys", lambda e: lambda: errno_of(os.rmdir, ctl(e.m) / "keys"), EPERM, None),
    ("rmdir-import", lambda e: lambda: errno_of(os.rmdir, kpath(e.m, "victim", "import")), EPERM, None),
    ("rm-status", lambda e: lambda: errno_of(os.unlink, ctl(e.m) / "status"), EPERM, None),
    ("rm-audit", lambda e: lambda: errno_of(os.unlink, ctl(e.m) / "audit.log"), EPERM, None),
    ("rm-state", lambda e: lambda: errno_of(os.unlink, kpath(e.m, "victim", "state")), EPERM, None),
    ("rm-material", lambda e: lambda: errno_of(os.unlink, kpath(e.m, "ext", "import/material")), EPERM, None),
    ("rmdir-control", lambda e: lambda: errno_of(os.rmdir, ctl(e.m)), EPERM, None),
    ("create-file", lambda e: lambda: errno_of(os.open, ctl(e.m) / "new", os.O_CREAT | os.O_WRONLY, 0o644),
     EPERM, None),
    ("create-in-key", lambda e: lambda: errno_of(os.open, kpath(e.m, "victim", "x"), os.O_CREAT | os.O_WRONLY,
                                                  0o644), EPERM, None),
    ("symlink", lambda e: lambda: errno_of(os.symlink, "/etc", kpath(e.m, "victim", "link")), EPERM, None),
    ("hardlink", lambda e: lambda: errno_of(os.link, ctl(e.m) / "status", ctl(e.m) / "status2"), EPERM, None),
    ("setxattr", lambda e: lambda: errno_of(os.setxattr, kpath(e.m, "victim", "state"), "user.x", b"1"), EPERM,
     None),
    ("chmod", lambda e: lambda: errno_of(os.chmod, kpath(e.m, "victim", "state"), 0o600), EPERM, None),
    ("chown", lambda e: lambda: errno_of(os.chown, kpath(e.m, "victim", "state"), 1234, 1234), EPERM, None),
]


@pytest.mark.parametrize("make, code, word", [s[1:] for s in STRUCTURE], ids=[s[0] for s in STRUCTURE])
def test_control_directory_structure_cannot_be_changed_but_by_mkdir_and_mv_in_keys(env, make, code, word):
    check_refused(env, make(env), code, word)
    assert sorted(os.listdir(ctl(env.m))) == sorted(
        ["keys", "README", "status", "audit.log", "default-key", "create-key", "decrypt", "reencrypt"])


def test_setfattr_to_an_unknown_or_unusable_key_is_refused(env):
    m = env.m
    content = (env.store.backing / "vdir" / "file").read_bytes()
    before = key_of(env.file)
    for value, code in ((b"no-such-key", EINVAL), (NOT_UTF8, EINVAL), (b"off", EACCES), (b"doomed", EACCES),
                        (b"ext", EACCES)):
        assert errno_of(os.setxattr, env.file, "user.kmsfs.key", value) == code, value
        assert key_of(env.file) == before
    assert (env.store.backing / "vdir" / "file").read_bytes() == content
    assert env.file.read_bytes() == FILE_DATA
    # Directories only accept known keys.
    assert errno_of(os.setxattr, env.dir, "user.kmsfs.key", b"no-such-key") == EINVAL
    assert json.loads(os.getxattr(m.path / "vdir" / "file", "user.kmsfs.key"))["Alias"] == "victim"


# ====================================================================== a second uid


USE_ACTIONS: list[tuple[str, Callable[[Env], tuple[Any, ...]], str]] = [
    ("open-file", lambda e: ("read", e.file), "OpenFile"),
    ("create-file", lambda e: ("create", e.dir / "by-1234", b"x"), "CreateFile"),
    ("encrypt", lambda e: ("transact", kpath(e.m, "victim", "encrypt"), b'{"Plaintext": "aGk="}'), "Encrypt"),
    ("generate-data-key", lambda e: ("transact", kpath(e.m, "victim", "generate-data-key"), b"{}"),
     "GenerateDataKey"),
    ("decrypt", lambda e: ("transact", ctl(e.m) / "decrypt", json.dumps({"CiphertextBlob": e.blob}).encode()),
     "Decrypt"),
    ("reencrypt", lambda e: ("transact", ctl(e.m) / "reencrypt",
                             json.dumps({"CiphertextBlob": e.blob, "DestinationKeyId": "victim"}).encode()),
     "ReEncrypt"),
]

ADMIN_ACTIONS: list[tuple[str, Callable[[Env], tuple[Any, ...]]]] = [
    ("state", lambda e: ("write", kpath(e.m, "victim", "state"), b"Disabled")),
    ("description", lambda e: ("write", kpath(e.m, "victim", "description"), b"mine now")),
    ("rotate", lambda e: ("write", kpath(e.m, "victim", "rotate"), b"1")),
    ("rotation", lambda e: ("write", kpath(e.m, "victim", "rotation"), b"30")),
    ("rotation-off", lambda e: ("write", kpath(e.m, "victim", "rotation"), b"off")),
    ("deletion", lambda e: ("write", kpath(e.m, "victim", "deletion"), b"7")),
    ("deletion-cancel", lambda e: ("write", kpath(e.m, "doomed", "deletion"), b"cancel")),
    ("rewrap", lambda e: ("write", kpath(e.m, "victim", "rewrap"), b"start")),
    ("grants", lambda e: ("write", kpath(e.m, "victim", "grants"), f"uid:{OTHER_UID} admin\n".encode())),
    ("default-key", lambda e: ("write", ctl(e.m) / "default-key", b"victim")),
    ("mkdir", lambda e: ("mkdir", kpath(e.m, "by-1234"))),
    ("create-key", lambda e: ("transact", ctl(e.m) / "create-key", b'{"Alias": "by-1234"}')),
    ("mv", lambda e: ("rename", kpath(e.m, "victim"), kpath(e.m, "stolen"))),
    ("material", lambda e: ("write", kpath(e.m, "ext", "import/material"), b"x" * 384)),
    ("wrapping-key", lambda e: ("read", kpath(e.m, "ext", "import/wrapping-key.pem"))),
]


@pytest.fixture
def other_uid(env: Env) -> Iterator[None]:
    require_other_uid()
    yield
    write_ctl(kpath(env.m, "victim", "grants"), "\n")
    write_ctl(kpath(env.m, "doomed", "grants"), "\n")
    write_ctl(kpath(env.m, "ext", "grants"), "\n")


@pytest.mark.parametrize("make, operation", [a[1:] for a in USE_ACTIONS], ids=[a[0] for a in USE_ACTIONS])
def test_using_a_key_without_a_use_grant_is_denied(env, other_uid, make, operation):
    count = len(audit(env.m))
    check_refused(env, lambda: as_user(*make(env))[0], EACCES, "use grant", uid=OTHER_UID)
    lines = [e for e in audit_since(env.m, count) if e["result"] == "denied"]
    assert [e["operation"] for e in lines] == [operation]
    assert lines[0]["key"] == env.victim["KeyId"]
    assert not (env.dir / "by-1234").exists()


@pytest.mark.parametrize("grant", ["none", "use"])
@pytest.mark.parametrize("make", [a[1] for a in ADMIN_ACTIONS], ids=[a[0] for a in ADMIN_ACTIONS])
def test_lifecycle_writes_without_admin_are_denied(env, other_uid, grant, make):
    if grant == "use":
        for alias in ("victim", "doomed", "ext"):
            write_ctl(kpath(env.m, alias, "grants"), f"uid:{OTHER_UID} use\ngid:{OTHER_UID} use\n")
    check_refused(env, lambda: as_user(*make(env))[0], EACCES, "", uid=OTHER_UID)
    assert not kpath(env.m, "by-1234").exists()


def test_a_use_grant_on_one_key_gives_nothing_on_another(env, other_uid):
    write_ctl(kpath(env.m, "off", "grants"), f"uid:{OTHER_UID} admin\n")
    try:
        check_refused(env, lambda: as_user("read", env.file)[0], EACCES, "use grant", uid=OTHER_UID)
        check_refused(env, lambda: as_user("write", kpath(env.m, "victim", "state"), b"Disabled")[0], EACCES,
                      "admin grant", uid=OTHER_UID)
        # ... and a grant to another uid or gid gives nothing to this one.
        write_ctl(kpath(env.m, "victim", "grants"), f"uid:{OTHER_UID + 1} admin\ngid:{OTHER_UID + 1} use\n")
        check_refused(env, lambda: as_user("read", env.file)[0], EACCES, "use grant", uid=OTHER_UID)
    finally:
        write_ctl(kpath(env.m, "off", "grants"), "\n")


# ====================================================================== lifecycle under load

WORKER = r"""
import errno, hashlib, json, os, sys, time

root, me, stop, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
fixed = json.loads(sys.argv[5])
SIZE = 3 * 4096 + 100

def content(name, gen):
    seed = hashlib.sha256(f"{name}:{gen}".encode()).digest()
    return (seed * (SIZE // 32 + 1))[:SIZE]

state = {"ok": 0, "eacces": 0, "wrong": [], "errors": [], "own": {}, "created": {}}

def attempt(what, fn):
    try:
        fn()
        state["ok"] += 1
        return True
    except OSError as exc:
        if exc.errno == errno.EACCES:
            state["eacces"] += 1
        else:
            state["errors"].append(f"{what}: {exc}")
        return False

def check(what, got, want):
    if got != want:
        state["wrong"].append(f"{what}: {len(got)} bytes, not the {len(want)} expected")

own_name = f"own-{me}"
own_path = os.path.join(root, own_name)
gen = 0
with open(own_path, "wb") as fh:
    fh.write(content(own_name, gen))
state["own"][own_name] = gen
own_fd = os.open(own_path, os.O_RDWR)
held = os.open(os.path.join(root, fixed[0][0]), os.O_RDONLY)
i = 0
while not os.path.exists(stop):
    i += 1
    name, data_gen = fixed[i % len(fixed)]
    def fresh_read():
        with open(os.path.join(root, name), "rb") as fh:
            check(name, fh.read(), content(name, data_gen))
    attempt("read " + name, fresh_read)
    attempt("held read", lambda: check("held", os.pread(held, SIZE + 10, 0), content(fixed[0][0], fixed[0][1])))
    new_gen = gen + 1
    def rewrite():
        # One pwrite: one FUSE write request, applied entirely or refused.
        assert os.pwrite(own_fd, content(own_name, new_gen), 0) == SIZE
    if attempt("write own", rewrite):
        gen = new_gen
        state["own"][own_name] = gen
    attempt("read own", lambda: check("own", os.pread(own_fd, SIZE + 10, 0), content(own_name, gen)))
    if i % 4 == 0:
        new_name = f"new-{me}-{i}"
        def create():
            with open(os.path.join(root, new_name), "xb") as fh:
                fh.write(content(new_name, 0))
            state["created"][new_name] = 0
        if not attempt("create", create):
            try:
                os.unlink(os.path.join(root, new_name))
            except FileNotFoundError:
                pass
os.close(own_fd)
os.close(held)
with open(out, "w") as fh:
    json.dump(state, fh)
"""


def test_rotate_rewrap_and_disable_while_processes_read_and_write(store, tmp_path):
    m = store.mount()
    meta = create_key(m, "busy")
    d = key_dir(m, "d", "busy")
    size = 3 * 4096 + 100

    def content(name: str, gen: int) -> bytes:
        seed = hashlib.sha256(f"{name}:{gen}".encode()).digest()
        return (seed * (size // 32 + 1))[:size]

    fixed = [(f"fixed-{i}", 0) for i in range(4)]
    for name, gen in fixed:
        (d / name).write_bytes(content(name, gen))
    stop = tmp_path / "stop"
    workers = []
    for n in range(3):
        out = tmp_path / f"worker{n}.json"
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(d), str(n), str(stop), str(out), json.dumps(fixed)],
                                stderr=subprocess.PIPE)
        workers.append((proc, out))
    try:
        time.sleep(0.8)
        write_ctl(kpath(m, "busy", "rotate"), "1")
        time.sleep(0.5)
        write_ctl(kpath(m, "busy", "rewrap"), "start")
        progress = wait_rewrap(m, "busy")
        assert progress["state"] == "done" and progress["failed"] == 0, progress
        time.sleep(0.5)
        write_ctl(kpath(m, "busy", "state"), "Disabled")
        time.sleep(1.0)
        write_ctl(kpath(m, "busy", "state"), "Enabled")
        time.sleep(0.8)
    finally:
        stop.touch()
        for proc, _ in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    results = []
    for proc, out in workers:
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert proc.returncode == 0, err
        results.append(json.loads(out.read_text()))
    for r in results:
        assert r["wrong"] == [], r["wrong"]  # never wrong data
        assert r["errors"] == [], r["errors"]  # only EACCES, never EIO
        assert r["ok"] > 20
    assert sum(r["eacces"] for r in results) > 0  # the disable was seen

    # After enable everything is readable and equals what was written.
    expected = dict(fixed)
    for r in results:
        expected.update(r["own"])
        expected.update(r["created"])
    on_disk = sorted(os.listdir(d))
    assert sorted(expected) == on_disk
    for name, gen in expected.items():
        assert (d / name).read_bytes() == content(name, gen), name
    # A last rewrap leaves every file on the newest version.
    write_ctl(kpath(m, "busy", "rewrap"), "start")
    assert wait_rewrap(m, "busy")["failed"] == 0
    assert {key_of(d / name)["KeyVersion"] for name in expected} == {2}
    assert info(m, "busy")["KeyState"] == "Enabled" and info(m, "busy")["KeyId"] == meta["KeyId"]
    m.unmount()
    m2 = store.mount()
    for name, gen in expected.items():
        assert (m2.path / "d" / name).read_bytes() == content(name, gen), name


# ====================================================================== the CLI says why


@pytest.mark.parametrize("mode", ["mount", "store"])
def test_cli_refusals_say_why_and_change_nothing(store, tmp_path, mode):
    if mode == "mount":
        m = store.mount()
        where = ["--mount", str(m.path)]
    else:
        where = ["--store", str(store.backing)]

    def k(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return cli(store, "key", *where, *args, input=input, check=check)

    k("create", "victim")
    bad_grants = tmp_path / "grants"
    bad_grants.write_text("uid:1234 owner\n")
    material = tmp_path / "material"
    material.write_bytes(os.urandom(384))
    before = {name: k("info", name).stdout for name in ("victim", "kmsfs-default")}
    cases: list[tuple[tuple[str, ...], bytes | None, str]] = [
        (("rotation", "victim", "366"), None, "7 to 365"),
        (("rotation", "victim", "weekly"), None, "7-365"),
        (("delete", "victim", "31"), None, "7 to 30"),
        (("delete", "victim", "6"), None, "7 to 30"),
        (("cancel-deletion", "victim"), None, "no deletion is scheduled"),
        (("default", "nope"), None, "no CMK"),
        (("disable", "kmsfs-default"), None, "filesystem-managed"),
        (("delete", "kmsfs-default", "7"), None, "filesystem-managed"),
        (("describe", "victim", "x" * 1025), None, "1024"),
        (("grants", "victim", "--set", str(bad_grants)), None, "role"),
        (("create", "bad name"), None, "alias"),
        (("create", "victim"), None, "exists"),
        (("alias", "victim", "kmsfs-default"), None, "exists already"),
        (("encrypt", "victim"), b"x" * 4097, "4096"),
        (("encrypt", "victim", "--context", "not json"), b"x", "not valid JSON"),
        (("decrypt", "AAAA"), None, "too short"),
        (("import", "victim", str(material)), None, "Origin EXTERNAL"),
        (("info", "nope"), None, "No such file"),
    ]
    for args, stdin, word in cases:
        result = k(*args, input=stdin, check=False)
        message = result.stderr.decode()
        assert result.returncode == 1, (args, result.stdout, message)
        assert message.startswith("kmsfs key: "), (args, message)
        assert word.lower() in message.lower(), (args, word, message)
        assert "Traceback" not in message
    assert {name: k("info", name).stdout for name in ("victim", "kmsfs-default")} == before
