"""Hostile and odd input, through real mounts: never a crash, never lost data.

1. Every writable control file of ``.kmsfs/`` is fuzzed with hypothesis: random
   bytes, non-UTF-8, writes of 64 KiB to 2 MiB (larger than the kernel's
   max_write, so they reach the daemon in pieces), commands split across two
   write(2) calls, writes at odd offsets, and valid syntax with values out of
   range.  Each write ends in a clean errno (never EIO, never a hang), changes
   nothing unless it is a documented valid command (whose effect is then
   checked exactly), and the daemon stays healthy.  The same for the
   transactional files, with random JSON-ish requests; what they answer is
   checked by decrypting it again.
2. Malformed file headers (every field truncated, oversized, of a wrong
   version or length, and random mutations) are answered with EIO and a log
   line that names the file; cases already in test_tamper.py are not repeated.
3. Odd names: random bytes (non-UTF-8, newlines), 255 bytes (and 256, 1025,
   4096: ENAMETOOLONG), odd names in the control directory, and a tree deeper
   than PATH_MAX, worked on through directory descriptors and checked by
   ``kmsfs fsck``.
4. Other users with ``-o allow_other``: a table of operations run as uid 1234
   on the mount and on a plain ext4 directory of the same layout must end
   with the same errnos and create the same owners, groups and modes (umask,
   setgid directories); key grants apply on top of the mode bits.
5. stress-ng's filesystem stressors, with --verify, on a mount.

Most tests share one mount (module scope) at a mountpoint every uid can
reach; a refusal changes nothing, and tests that change state restore it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from conftest import IN_CI, Mount, Store, make_store, status_state
from kmsfs.format import DEFAULT_BLOCK_SIZE, HEADER_MIN_SIZE, ciphertext_size, parse_header
from test_lifecycle import (
    OTHER_UID, USER_PYTHON, b64, create_key, ctl, info, kpath, open_mountpoint, read_ctl, require_other_uid,
    transact, write_ctl,
)

pytestmark = pytest.mark.mount

HEADER = "user.kmsfs"
CONTEXT = "user.kmsfs.context"
#: What a refused control write may answer.  EIO means the daemon hit a bug.
CLEAN = frozenset({errno.EINVAL, errno.EPERM, errno.EACCES, errno.EBADF})
#: Transactions also answer EEXIST (create-key of an existing alias).
CLEAN_TXN = CLEAN | {errno.EEXIST}
#: The largest control command kmsfs takes (controldir.MAX_COMMAND): larger
#: writes may reach the daemon in pieces, so they are refused whole.
MAX_COMMAND = 64 * 1024
#: Every blocking step gets this long before the test ends the daemon and fails.
HANG_SECONDS = 30

SECRET = b"victim secret"
CTX = '{"purpose": "tests"}'
CTX_SECRET = b"with context"

FUZZ = settings(
    max_examples=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# ====================================================================== the shared mount


class Env:
    """The shared mount and its keys.  Not a dataclass: hypothesis prints the fields of
    those in a failing example, and the store's whole environment with them."""

    def __init__(self, store: Store, m: Mount, blob: str, ctx_blob: str, key_ids: dict[str, str]) -> None:
        self.store = store
        self.m = m
        self.blob = blob  # victim ciphertext of SECRET, no context
        self.ctx_blob = ctx_blob  # victim ciphertext of CTX_SECRET under CTX
        self.key_ids = key_ids  # alias -> KeyId

    def __repr__(self) -> str:
        return f"Env({self.m.path})"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    store = make_store(tmp_path_factory.mktemp("hostile") / "s")
    with open_mountpoint() as mnt:
        options = ["allow_other"] if os.geteuid() == 0 else []
        m = store.mount(mnt, *options)
        try:
            os.chmod(m.path, 0o755)
            create_key(m, "victim")
            write_ctl(kpath(m, "victim", "description"), "the key under test")
            write_ctl(kpath(m, "victim", "rotation"), "90")
            write_ctl(kpath(m, "victim", "grants"), "uid:4321 use\ngid:4321 admin\n")
            create_key(m, "off")
            write_ctl(kpath(m, "off", "state"), "Disabled")
            create_key(m, "doomed")
            write_ctl(kpath(m, "doomed", "deletion"), "20")
            transact(ctl(m) / "create-key", {"Alias": "ext", "Origin": "EXTERNAL"})
            blob = transact(kpath(m, "victim", "encrypt"), {"Plaintext": b64(SECRET)})["CiphertextBlob"]
            ctx_blob = transact(kpath(m, "victim", "encrypt"),
                                {"Plaintext": b64(CTX_SECRET), "EncryptionContext": CTX})["CiphertextBlob"]
            key_ids = {alias: info(m, alias)["KeyId"] for alias in os.listdir(ctl(m) / "keys")}
            yield Env(store, m, blob, ctx_blob, key_ids)
        finally:
            for mount in store.mounts:
                mount.cleanup()


# ---------------------------------------------------------------------- health of the daemon


@contextlib.contextmanager
def no_hang(m: Mount, what: str, seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail instead of hanging: past ``seconds`` the daemon is ended (by pid), so blocked calls return."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True, check=False)

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield
    except BaseException:
        if fired.is_set():
            raise AssertionError(f"{what} hung for more than {seconds}s; the daemon was ended\n"
                                 f"{m.log()[-3000:]}") from None
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise AssertionError(f"{what} hung for more than {seconds}s; the daemon was ended")


def log_mark(m: Mount) -> int:
    try:
        return m.log_file.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(m: Mount, mark: int) -> str:
    try:
        with open(m.log_file, "rb") as fh:
            fh.seek(mark)
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def assert_healthy(m: Mount, mark: int) -> None:
    """The daemon runs, serves a normal file, and logged no unexpected error since ``mark``."""
    assert m.proc is not None and m.proc.poll() is None, f"the daemon died:\n{m.log()[-3000:]}"
    probe = m.path / "health-probe"
    data = os.urandom(3 * 4096 + 17)
    with no_hang(m, "a health probe"):
        probe.write_bytes(data)
        assert probe.read_bytes() == data
        probe.unlink()
    new = log_since(m, mark)
    assert "unexpected error" not in new and "Traceback" not in new, new[-5000:]


# ---------------------------------------------------------------------- key state


def key_state(m: Mount) -> dict[str, Any]:
    """Everything a refused command must leave as it was."""
    keys = {}
    for alias in sorted(os.listdir(ctl(m) / "keys")):
        # info has everything but grants and rewrap progress (only victim can start a rewrap).
        keys[alias] = {"info": json.loads(kpath(m, alias, "info").read_bytes()),
                       "grants": read_ctl(kpath(m, alias, "grants"))}
    keys["victim"]["rewrap"] = json.loads(kpath(m, "victim", "rewrap").read_bytes())
    return {"keys": keys, "default": read_ctl(ctl(m) / "default-key"),
            "status": status_state((ctl(m) / "status").read_bytes())}


def errno_name(code: int | None) -> str:
    return "ok" if code is None else errno.errorcode.get(code, str(code))


# ====================================================================== 1. control files


def text_of(data: bytes) -> str | None:
    """A command as kmsfs reads it: UTF-8, surrounding whitespace stripped; None if not UTF-8."""
    try:
        return data.decode("utf-8", "strict").strip()
    except UnicodeDecodeError:
        return None


def ascii_number(text: str, low: int, high: int) -> bool:
    return bool(re.fullmatch(r"[0-9]{1,6}", text)) and low <= int(text) <= high


def parse_grants(text: str) -> dict[str, str] | None:
    """The grants a text sets, or None when kmsfs must refuse it (independent of kmsfs's parser)."""
    grants = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            return None
        match = re.fullmatch(r"(uid|gid):([0-9]+)", parts[0])
        if not match or int(match[2]) > 0xFFFFFFFF or parts[1] not in ("use", "admin"):
            return None
        grants[f"{match[1]}:{int(match[2])}"] = parts[1]
    return grants


REFUSE = "refuse"
SKIP = "skip"  # a valid command whose effect is not modelled here: not generated
NOOP = "noop"


@dataclass
class Change:
    """A valid command: how the key state changes, and the write that undoes it."""

    apply: Callable[[dict[str, Any]], None]
    undo_path: str
    undo: bytes


def _description(env: Env, data: bytes) -> Change | str:
    text = text_of(data)
    if text is None or len(data) > MAX_COMMAND or len(text.encode()) > 1024:
        return REFUSE

    def apply(state: dict[str, Any]) -> None:
        state["keys"]["victim"]["info"]["Description"] = text

    return Change(apply, "keys/victim/description", b"the key under test")


def _grants(env: Env, data: bytes) -> Change | str:
    text = text_of(data)
    grants = None if text is None or len(data) > MAX_COMMAND else parse_grants(text)
    if grants is None:
        return REFUSE

    def apply(state: dict[str, Any]) -> None:
        state["keys"]["victim"]["grants"] = "".join(f"{who} {role}\n" for who, role in sorted(grants.items()))

    return Change(apply, "keys/victim/grants", b"uid:4321 use\ngid:4321 admin\n")


def _refuse_unless(valid: Callable[[Env, str], bool]) -> Callable[[Env, bytes], Change | str]:
    def oracle(env: Env, data: bytes) -> Change | str:
        text = text_of(data)
        if text is None or len(data) > MAX_COMMAND:
            return REFUSE
        return SKIP if valid(env, text) else REFUSE

    return oracle


def _is_enabled_key(env: Env, ref: str) -> bool:
    ids = {env.key_ids["victim"], env.key_ids["kmsfs-default"]}
    if ref in ("victim", "kmsfs-default") or ref in ids:
        return True
    try:
        return str(uuid.UUID(ref)) in ids
    except ValueError:
        return False


#: (id, control file, oracle): which writes kmsfs must refuse, and what the others do.
CONTROL_FILES: list[tuple[str, str, Callable[[Env, bytes], Change | str]]] = [
    ("state", "keys/victim/state", _refuse_unless(lambda e, t: t in ("Enabled", "Disabled"))),
    ("description", "keys/victim/description", _description),
    ("rotate", "keys/victim/rotate", _refuse_unless(lambda e, t: True)),  # any text rotates
    ("rotation", "keys/victim/rotation",
     _refuse_unless(lambda e, t: t == "off" or ascii_number(t, 7, 365))),
    ("deletion", "keys/victim/deletion", _refuse_unless(lambda e, t: ascii_number(t, 7, 30))),
    ("rewrap", "keys/victim/rewrap", _refuse_unless(lambda e, t: t == "start")),
    ("grants", "keys/victim/grants", _grants),
    ("default-key", "default-key", _refuse_unless(_is_enabled_key)),
    # Keys whose state refuses every command, whatever its syntax.
    ("ext-material", "keys/ext/import/material", lambda e, d: REFUSE),
    ("kmsfs-key-material", "keys/victim/import/material", lambda e, d: REFUSE),
    ("doomed-state", "keys/doomed/state", lambda e, d: REFUSE),
    ("doomed-rotate", "keys/doomed/rotate", lambda e, d: REFUSE),
    ("doomed-deletion", "keys/doomed/deletion", _refuse_unless(lambda e, t: t == "cancel")),
    ("ext-rotation", "keys/ext/rotation", _refuse_unless(lambda e, t: t == "off")),  # off: already so
    ("default-state", "keys/kmsfs-default/state", _refuse_unless(lambda e, t: t == "Enabled")),
]

WORDS = [
    "Enabled", "Disabled", "PendingDelete", "PendingImport", "enabled", "off", "OFF", "cancel", "start",
    "0", "6", "7", "30", "31", "365", "366", "999999", "1000000", "-7", "+30", "007", "1e3", "0x1e", "30.0",
    "1_0", "²", "٣٠", "３０", "𝟑𝟎", "uid:", "gid:", "1234", " use", " admin", " owner", "uid:1234 use",
    "gid:0 admin", "uid:² use", "uid:١ use", "uid:4294967296 use", "uid:-1 use", "victim", "kmsfs-default",
    "doomed", "ext", "off", "no-such-key", "00000000-0000-0000-0000-000000000000", "\n", "\r\n", " ", "\t",
    "\x00", "\x85", "\u2028", "\ufeff", "#", "é", "\\", "\"", "'", "%s", "${HOME}", ":",
]
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xe2\x82", b"\xf8\x88\x80\x80\x80"]
#: Fillers for oversized writes; the first would be valid grants if it were cut into pieces.
FILLERS = [b"uid:1234567 use\n", b"Disabled\n", b" ", b"x", b"30\n", b"\n", b"\xff"]
OVERSIZES = [MAX_COMMAND + 1, 1 << 20, (1 << 20) + 4096, 2 << 20]

near_valid = st.lists(st.sampled_from(WORDS) | st.text(max_size=6), min_size=1, max_size=5).map(
    lambda parts: "".join(parts).encode())
not_utf8 = st.tuples(st.binary(max_size=40), st.sampled_from(BAD_UTF8), near_valid | st.binary(max_size=40)).map(
    lambda t: b"".join(t))
oversized = st.tuples(st.sampled_from(FILLERS), st.sampled_from(OVERSIZES)).map(
    lambda t: (t[0] * (t[1] // len(t[0]) + 1))[:t[1]])
#: Numbers as Unicode writes them: "²", "٣٠", "３０", "Ⅻ"... (str.isdigit() takes some, int() others).
unicode_numbers = st.tuples(
    st.sampled_from(["", " ", "uid:", "gid:", "+", "-", "0"]),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=3),
    st.sampled_from(["", "\n", " use", " admin\n", "0"]),
).map(lambda t: "".join(t).encode())
commands = st.one_of(
    near_valid, near_valid, not_utf8, unicode_numbers, st.binary(max_size=600), st.text(max_size=200).map(str.encode), oversized,
    st.binary(min_size=1000, max_size=3000),
)


def write_pieces(path: Path, pieces: list[bytes], how: str, offset: int) -> list[int | None]:
    """Each piece in its own write(2) on one open file: the errno (or None) of each."""
    flags = {"write": os.O_WRONLY, "rdwr-trunc": os.O_RDWR | os.O_TRUNC, "append": os.O_WRONLY | os.O_APPEND,
             "pwrite": os.O_WRONLY}[how]
    if path.name in ("rotate", "material"):
        flags = (flags & ~os.O_ACCMODE) | os.O_WRONLY  # write-only files
    results: list[int | None] = []
    fd = os.open(path, flags)
    try:
        for piece in pieces:
            try:
                if how == "pwrite":
                    written = os.pwrite(fd, piece, offset)
                else:
                    written = os.write(fd, piece)
                assert written == len(piece), f"short write: {written} of {len(piece)} bytes"
                results.append(None)
            except OSError as exc:
                results.append(exc.errno)
    finally:
        os.close(fd)
    return results


def check_control_write(env: Env, rel: str, oracle: Callable[[Env, bytes], Change | str],
                        pieces: list[bytes], how: str, offset: int = 0) -> bool:
    """Write the pieces; each is refused cleanly or does exactly what the oracle says.  False: not modelled."""
    m = env.m
    # An empty write(2) never reaches the daemon: the kernel answers it alone.
    outcomes = [NOOP if not piece else oracle(env, piece) for piece in pieces]
    if SKIP in outcomes:
        return False
    with contextlib.suppress(Exception):  # outside hypothesis there is nothing to note
        note(f"{rel}: {how} at {offset}: {[p[:80] for p in pieces]} ({[len(p) for p in pieces]} bytes)")
    mark = log_mark(m)
    before = key_state(m)
    with no_hang(m, f"a write to {rel}"):
        results = write_pieces(ctl(m) / rel, pieces, how, offset)
    expected = copy.deepcopy(before)
    undo = None
    for piece, outcome, result in zip(pieces, outcomes, results):
        if outcome == REFUSE:
            assert result in CLEAN, (rel, piece[:80], len(piece), errno_name(result))
        elif outcome == NOOP:
            assert result is None or result in CLEAN, (rel, piece[:80], errno_name(result))
        else:
            assert isinstance(outcome, Change)
            assert result is None, (rel, piece[:80], errno_name(result))
            outcome.apply(expected)
            undo = outcome
    try:
        assert key_state(m) == expected, (rel, [p[:80] for p in pieces])
    finally:
        if undo is not None:
            write_ctl(ctl(m) / undo.undo_path, undo.undo)
    if undo is not None:
        assert key_state(m) == before
    assert m.proc is not None and m.proc.poll() is None, m.log()[-3000:]
    new = log_since(m, mark)
    assert "unexpected error" not in new and "Traceback" not in new, new[-5000:]
    return True


@pytest.mark.parametrize("rel, oracle", [c[1:] for c in CONTROL_FILES], ids=[c[0] for c in CONTROL_FILES])
@FUZZ
@given(data=st.data())
def test_fuzzed_control_writes_are_refused_cleanly_or_do_exactly_what_they_say(env, rel, oracle, data):
    how = data.draw(st.sampled_from(["write", "write", "pwrite", "append", "rdwr-trunc", "split"]), "how")
    command = data.draw(commands, "command")
    offset = data.draw(st.sampled_from([0, 1, 4095, 1 << 31, 1 << 40]), "offset") if how == "pwrite" else 0
    pieces = [command]
    if how == "split":
        how = "write"
        if len(command) >= 2:
            cut = data.draw(st.integers(1, len(command) - 1), "cut")
            pieces = [command[:cut], command[cut:]]
    assume(check_control_write(env, rel, oracle, pieces, how, offset))


PINNED: list[tuple[str, list[bytes], str, int]] = [
    # (id, pieces, how, offset)
    ("superscript-two", ["²".encode()], "write", 0),  # str.isdigit() is true, int() refuses it
    ("arabic-indic-thirty", ["٣٠".encode()], "write", 0),  # int() takes it: must still be refused
    ("fullwidth-thirty", ["３０".encode()], "write", 0),
    ("grant-superscript-uid", ["uid:² use".encode()], "write", 0),
    ("grant-arabic-uid", ["uid:١ use".encode()], "write", 0),
    ("lone-continuation-byte", [b"\xb2"], "write", 0),
    # A valid first max_write piece of grants, then garbage: nothing may be applied.
    ("split-by-the-kernel", [b"uid:1234567 use\n" * (1 << 16) + b"not a grant\n"], "write", 0),
    ("two-megabytes", [b"x" * (2 << 20)], "write", 0),
    ("whitespace-padded-megabyte", [b" " * (1 << 20) + b"Disabled"], "write", 0),
    ("disabled-in-two-writes", [b"Disab", b"led"], "write", 0),
    ("thirty-in-two-writes", [b"3", b"0"], "write", 0),
    ("far-offset", [b"7"], "pwrite", 1 << 40),
]


@pytest.mark.parametrize("pieces, how, offset", [p[1:] for p in PINNED], ids=[p[0] for p in PINNED])
@pytest.mark.parametrize("rel, oracle", [c[1:] for c in CONTROL_FILES], ids=[c[0] for c in CONTROL_FILES])
def test_pinned_hostile_control_writes(env, rel, oracle, pieces, how, offset):
    check_control_write(env, rel, oracle, pieces, how, offset)


def test_control_files_leave_the_daemon_healthy(env):
    """After all the fuzzing above (and on its own): a file round-trips, nothing unexpected was logged."""
    assert_healthy(env.m, 0)


# ---------------------------------------------------------------------- transactional files


TXN_FILES = ["keys/victim/encrypt", "keys/victim/generate-data-key", "decrypt", "reencrypt", "create-key",
             "keys/off/encrypt", "keys/ext/generate-data-key"]
FIELDS = ["Plaintext", "EncryptionContext", "KeySpec", "NumberOfBytes", "CiphertextBlob", "DestinationKeyId",
          "SourceEncryptionContext", "DestinationEncryptionContext", "Alias", "Description", "Origin"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
contexts = st.one_of(
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3).map(json.dumps),
    st.sampled_from([CTX, "", "{}", "[]", "null", '{"k": 1}', "not json", "[" * 1000, '{"a":' * 500,
                     json.dumps({"k": "v" * 1100}), '{"a": "\\ud800"}']),
)


def field_values(env: Env) -> st.SearchStrategy[Any]:
    blob = base64.b64decode(env.blob)
    mutated = [b64(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:]) for i in (0, 4, 5, 21, 25, len(blob) - 1)]
    return st.one_of(
        json_values,
        st.binary(max_size=5000).map(b64),
        st.sampled_from([env.blob, env.ctx_blob, *mutated, b64(blob[:40]), env.blob + "=", env.blob[:-2], "===",
                         "not base64!", ""]),
        contexts,
        st.sampled_from(["AES_256", "AES_128", "AES_512", "aes_256", 0, 1, 32, 1024, 1025, -1, 2**64, True]),
        st.sampled_from(["victim", "off", "doomed", "ext", "kmsfs-default", "nope", env.key_ids["victim"],
                         env.key_ids["victim"].upper(), "a" * 61, ".hidden", "new key", "nl\n", "ok-alias"]),
        st.sampled_from(["KMSFS", "EXTERNAL", "AWS_KMS", "kmsfs", None]),
        st.text(min_size=1020, max_size=1030),
    )


def requests(env: Env) -> st.SearchStrategy[tuple[bytes, bool]]:
    """(raw request, whether it is a serialised dict: every strict prefix of it is incomplete)."""
    dicts = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), field_values(env), max_size=5)
    as_json = dicts.map(lambda d: (json.dumps(d).encode(), True))
    mangled = st.tuples(dicts.map(lambda d: json.dumps(d).encode()), st.integers(0, 200), st.binary(max_size=20)).map(
        lambda t: (t[0][:t[1]] + t[2], False))
    special = st.sampled_from([
        b"[" * 50000, b"{" * 30000, b'{"a":' * 12000, b'{"NumberOfBytes": 1' + b"0" * 5000 + b"}",
        b'{"Plaintext": "' + b"A" * 70000 + b'"}', b" " * (1 << 20), b'{"Plaintext": NaN}',
        b'{"Plaintext": "aGk=", "Plaintext": 5}', b"\xef\xbb\xbf{}", '{"Plaintext": "aGk="}'.encode("utf-16"),
        b'{"Plaintext": "aGk="}\x00', b"{}" * 100, b'{"KeySpec": []}', b'{"KeySpec": {"AES_256": 1}}',
        b'{"Alias": ["x"], "Origin": []}', b'{"DestinationKeyId": {}, "CiphertextBlob": []}', b'{"EncryptionContext": "' + b"[" * 1000 + b'", "Plaintext": ""}',
    ])
    return st.one_of(as_json, as_json, mangled, special.map(lambda r: (r, False)),
                     st.binary(max_size=300).map(lambda r: (r, False)))


def run_transaction(path: Path, pieces: list[bytes]) -> tuple[int | None, bytes]:
    """Write the pieces on one open file and read the answer: (errno or None, answer)."""
    fd = os.open(path, os.O_RDWR)
    try:
        for piece in pieces:
            try:
                os.write(fd, piece)
            except OSError as exc:
                return exc.errno, b""
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError as exc:
            return exc.errno, b""
        return None, b"".join(chunks)
    finally:
        os.close(fd)


def create_would_succeed(env: Env, raw: bytes) -> bool:
    """Whether a create-key request is valid (an independent model of kmsfs's rules)."""
    try:
        request = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    if not isinstance(request, dict):
        return False
    alias = request.get("Alias")
    description = request.get("Description", "")
    return (isinstance(alias, str) and bool(re.fullmatch(r"[A-Za-z0-9_.\-]{1,60}", alias))
            and not alias.startswith(".") and alias not in env.key_ids
            and request.get("Origin", "KMSFS") in ("KMSFS", "EXTERNAL")
            and isinstance(description, str) and len(description.encode("utf-8", "surrogatepass")) <= 1024)


def decrypt_back(m: Mount, blob: str, context: Any) -> bytes:
    request = {"CiphertextBlob": blob}
    if context not in (None, ""):
        request["EncryptionContext"] = context
    return base64.b64decode(transact(ctl(m) / "decrypt", request)["Plaintext"])


def check_answer(env: Env, rel: str, raw: bytes, answer: bytes) -> None:
    """A transaction that succeeded answered exactly what it was asked."""
    reply = json.loads(answer)
    request = json.loads(raw)
    victim = env.key_ids["victim"]
    if rel == "keys/victim/encrypt":
        assert reply["KeyId"] == victim
        plain = base64.b64decode(request["Plaintext"])
        assert decrypt_back(env.m, reply["CiphertextBlob"], request.get("EncryptionContext")) == plain
    elif rel == "keys/victim/generate-data-key":
        assert reply["KeyId"] == victim
        plain = base64.b64decode(reply["Plaintext"])
        size = request.get("NumberOfBytes") if "KeySpec" not in request and "NumberOfBytes" in request else \
            {"AES_256": 32, "AES_128": 16}[request.get("KeySpec", "AES_256")]
        assert len(plain) == size
        assert decrypt_back(env.m, reply["CiphertextBlob"], request.get("EncryptionContext")) == plain
    elif rel == "decrypt":
        assert reply["KeyId"] == victim
        assert base64.b64decode(reply["Plaintext"]) in (SECRET, CTX_SECRET)
    elif rel == "reencrypt":
        source = decrypt_back(env.m, request["CiphertextBlob"],
                              request.get("SourceEncryptionContext", request.get("EncryptionContext")))
        context = request.get("DestinationEncryptionContext", request.get("EncryptionContext"))
        assert decrypt_back(env.m, reply["CiphertextBlob"], context) == source
    else:
        raise AssertionError(f"{rel} must not succeed: {answer[:200]!r}")


@pytest.mark.parametrize("rel", TXN_FILES)
@FUZZ
@given(data=st.data())
def test_fuzzed_transactions_are_refused_cleanly_or_answered_correctly(env, rel, data):
    m = env.m
    raw, whole = data.draw(requests(env), "request")
    if rel == "create-key":
        assume(not create_would_succeed(env, raw))
    pieces = [raw]
    if whole and len(raw) >= 2 and data.draw(st.booleans(), "split"):
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(raw) - 1), min_size=1, max_size=3), "cuts")))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    note(f"{rel}: {[p[:100] for p in pieces]} ({len(raw)} bytes)")
    mark = log_mark(m)
    before = key_state(m)
    with no_hang(m, f"a transaction on {rel}"):
        code, answer = run_transaction(ctl(m) / rel, pieces)
        if code is None and not raw:
            assert answer == b""  # an empty write is no request: nothing to answer
        elif code is None:
            check_answer(env, rel, raw, answer)
        else:
            assert code in CLEAN_TXN, (rel, raw[:200], errno_name(code))
            if len(raw) > MAX_COMMAND:
                assert code == errno.EINVAL
    assert key_state(m) == before
    assert m.proc is not None and m.proc.poll() is None, m.log()[-3000:]
    new = log_since(m, mark)
    assert "unexpected error" not in new and "Traceback" not in new, new[-5000:]


@FUZZ
@given(plain=st.binary(max_size=4096), context=st.sampled_from([None, CTX, '{"a": "b", "c": "d"}']),
       cuts=st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_a_valid_request_split_across_writes_is_answered_whole(env, plain, context, cuts):
    request = {"Plaintext": b64(plain)}
    if context:
        request["EncryptionContext"] = context
    raw = json.dumps(request).encode()
    points = sorted({min(len(raw) - 1, max(1, int(c * len(raw)))) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)])]
    with no_hang(env.m, "a split request"):
        code, answer = run_transaction(kpath(env.m, "victim", "encrypt"), pieces)
    assert code is None, errno_name(code)
    assert decrypt_back(env.m, json.loads(answer)["CiphertextBlob"], context) == plain


def test_an_oversized_request_is_refused_and_the_open_file_takes_the_next(env):
    """Requests accumulate across writes only up to 64 KiB; beyond, EINVAL and a fresh start."""
    fd = os.open(kpath(env.m, "victim", "encrypt"), os.O_RDWR)
    try:
        os.write(fd, b'{"Plaintext": "' + b"A" * 40000)  # incomplete, accepted so far
        with pytest.raises(OSError) as exc:
            os.write(fd, b"A" * 40000)  # now over 64 KiB
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as exc:
            os.write(fd, b"x" * (3 << 20))  # many max_write pieces, none taken
        assert exc.value.errno == errno.EINVAL
        os.write(fd, json.dumps({"Plaintext": b64(b"fresh")}).encode())
        answer = json.loads(os.read(fd, 65536))
    finally:
        os.close(fd)
    assert decrypt_back(env.m, answer["CiphertextBlob"], None) == b"fresh"


# ====================================================================== 2. malformed headers


HDR_CONTEXT = b'{"dept":"finance"}'
HDR_SIZE = 2 * 4096 + 5


def _ctx_len(raw: bytes) -> int:
    return int.from_bytes(raw[44:46], "big")


def _at(offset: int, value: bytes) -> Callable[[bytes, Env], bytes]:
    return lambda raw, env: raw[:offset] + value + raw[offset + len(value):]


def _length_field(value: Callable[[int], int]) -> Callable[[bytes, Env], bytes]:
    return lambda raw, env: raw[:44] + struct.pack(">H", value(_ctx_len(raw))) + raw[46:]


def _context(new: bytes | Callable[[int], bytes]) -> Callable[[bytes, Env], bytes]:
    """The context replaced, its length field kept consistent."""
    def mutate(raw: bytes, env: Env) -> bytes:
        length = _ctx_len(raw)
        body = new(length) if callable(new) else new
        return raw[:44] + struct.pack(">H", len(body)) + body + raw[46 + length:]
    return mutate


def _key_id_of(alias: str) -> Callable[[bytes, Env], bytes]:
    return lambda raw, env: raw[:24] + uuid.UUID(env.key_ids[alias]).bytes + raw[40:]


EIO = errno.EIO
#: name: (mutation of a header with context HDR_CONTEXT, errno, words of the log line).
#: Only cases test_tamper.py does not have (it flips a bit in each field, cuts or adds
#: one byte, and sets versions 0, 1 and 3, the flags byte and block sizes 2**11 and 2**13).
MALFORMED: dict[str, tuple[Callable[[bytes, Env], bytes], int, tuple[str, ...]]] = {
    "magic-only": (lambda r, e: r[:4], EIO, ("too short",)),
    "magic-and-version": (lambda r, e: r[:5], EIO, ("too short",)),
    "one-byte-short-of-the-minimum": (lambda r, e: r[:HEADER_MIN_SIZE - 1], EIO, ("too short",)),
    "cut-in-file-id": (lambda r, e: r[:16], EIO, ("too short",)),
    "cut-in-key-id": (lambda r, e: r[:30], EIO, ("too short",)),
    "cut-in-key-version": (lambda r, e: r[:42], EIO, ("too short",)),
    "cut-in-context-length": (lambda r, e: r[:45], EIO, ("too short",)),
    "cut-in-context": (lambda r, e: r[:46 + _ctx_len(r) // 2], EIO, ("too short",)),
    "cut-in-nonce": (lambda r, e: r[:46 + _ctx_len(r) + 6], EIO, ("too short",)),
    "cut-in-wrapped-dek": (lambda r, e: r[:-20], EIO, ("too short",)),
    "lowercase-magic": (_at(0, b"kmsf"), EIO, ("magic",)),
    "version-255": (_at(4, b"\xff"), EIO, ("version 255 is not supported",)),
    "reserved-byte": (_at(7, b"\x01"), EIO, ("flags",)),
    "block-size-0": (_at(6, b"\x00"), EIO, ("block size",)),
    "block-size-2-21": (_at(6, b"\x15"), EIO, ("block size",)),
    "block-size-255": (_at(6, b"\xff"), EIO, ("block size",)),
    "key-version-0": (_at(40, bytes(4)), EIO, ("key version is 0",)),
    "key-version-max": (_at(40, b"\xff" * 4), EIO, ("4294967295",)),
    "context-length-plus-one": (_length_field(lambda n: n + 1), EIO, ("does not match",)),
    "context-length-minus-one": (_length_field(lambda n: n - 1), EIO, ("does not match",)),
    "context-length-4097": (_length_field(lambda n: 4097), EIO, ("context length out of range",)),
    "context-length-65535": (_length_field(lambda n: 0xFFFF), EIO, ("context length out of range",)),
    "context-not-utf8": (_context(lambda n: b"\xff" * n), EIO, ("context is not valid JSON",)),
    "context-not-canonical": (_context(b'{"dept": "finance"}'), EIO, ("canonical",)),
    "context-an-array": (_context(b'["dept","finance"]'), EIO, ("canonical",)),
    "context-a-number-value": (_context(b'{"dept":1}'), EIO, ("canonical",)),
    "context-lone-surrogate": (_context(b'{"a":"\\ud800"}'), EIO, ("canonical",)),
    "context-nested-3000-deep": (_context(b"[" * 3000), EIO, ("context is not valid JSON",)),
    "context-3000-digit-number": (_context(b'{"a":' + b"1" * 3000 + b"}"), EIO, ("canonical",)),
    "context-removed": (_context(b""), EIO, ("could not unwrap",)),
    "nonce-one-byte-short": (lambda r, e: r[:46 + _ctx_len(r) + 11] + r[46 + _ctx_len(r) + 12:], EIO,
                             ("does not match",)),
    "oversized-by-3000": (lambda r, e: r + os.urandom(3000), EIO, ("does not match",)),
    "header-twice": (lambda r, e: r + r, EIO, ("does not match",)),
    "all-zero": (lambda r, e: bytes(len(r)), EIO, ("magic",)),
    "all-ones": (lambda r, e: b"\xff" * len(r), EIO, ("magic",)),
    "key-id-of-another-key": (_key_id_of("victim"), EIO, ("could not unwrap",)),
    # The file's key is looked up before the HSM checks the header: a header that
    # names a key which is not Enabled is refused as for any file under that key.
    "key-id-of-a-disabled-key": (_key_id_of("off"), errno.EACCES, ("is Disabled",)),
    "key-id-of-a-key-pending-import": (_key_id_of("ext"), errno.EACCES, ("is PendingImport",)),
}


def wait_no_open_files(m: Mount, timeout: float = 10) -> None:
    """The kernel sends release asynchronously: wait until the daemon has let go of every file."""
    deadline = time.monotonic() + timeout
    while json.loads((ctl(m) / "status").read_bytes())["open_files"]:
        assert time.monotonic() < deadline, "files still open in the daemon"
        time.sleep(0.01)


def read_errno(path: Path) -> tuple[int | None, bytes]:
    try:
        return None, path.read_bytes()
    except OSError as exc:
        return exc.errno, b""


def logged_about(m: Mount, mark: int, backing_file: Path) -> list[str]:
    where = os.path.realpath(backing_file) + ":"
    return [line for line in log_since(m, mark).splitlines() if where in line]


def test_malformed_headers_are_answered_with_eio_and_a_log_line(env):
    m = env.m
    d = m.path / "hdr"
    d.mkdir()
    os.setxattr(d, CONTEXT, HDR_CONTEXT)
    content = os.urandom(HDR_SIZE)
    for name in [*MALFORMED, "intact"]:
        (d / name).write_bytes(content)
    wait_no_open_files(m)
    original = os.getxattr(env.store.backing / "hdr" / "intact", HEADER)
    assert HDR_CONTEXT in original
    mark = log_mark(m)
    for name, (mutate, _, _) in MALFORMED.items():
        backing = env.store.backing / "hdr" / name
        raw = mutate(os.getxattr(backing, HEADER), env)
        assert raw != original and len(raw) < 4000, name
        os.setxattr(backing, HEADER, raw)
    for name, (_, code, words) in MALFORMED.items():
        path = d / name
        with no_hang(m, f"reading {name}"):
            got, _ = read_errno(path)
            assert got == code, (name, errno_name(got))
            lines = logged_about(m, mark, env.store.backing / "hdr" / name)
            assert lines, f"no log line names hdr/{name}"
            for word in words:
                assert any(word in line for line in lines), (name, word, lines)
            assert path.stat().st_size == HDR_SIZE  # stat needs no header
            # Asking for the file's key answers (or refuses) cleanly too.
            try:
                json.loads(os.getxattr(path, "user.kmsfs.key"))
            except OSError as exc:
                assert exc.errno in (EIO, errno.ENODATA), (name, exc)
            try:
                os.listxattr(path)
            except OSError as exc:
                assert exc.errno == EIO, (name, exc)
            # A damaged file can still be moved away and deleted.
            os.rename(path, d / f"{name}.damaged")
            os.unlink(d / f"{name}.damaged")
    assert (d / "intact").read_bytes() == content
    assert_healthy(m, mark)


mutations = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4000), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 4000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 4000)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("insert"), st.integers(0, 4000), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("delete"), st.integers(0, 4000), st.integers(1, 20)),
    st.tuples(st.just("context-length"), st.integers(0, 0xFFFF)),
), min_size=1, max_size=4)


def mutate_header(raw: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(raw)
    for op in ops:
        kind = op[0]
        at = op[1] % (len(out) + 1) if kind in ("flip", "set", "truncate", "insert", "delete") else 0
        if kind == "flip" and at < len(out):
            out[at] ^= op[2]
        elif kind == "set":
            out[at:at + len(op[2])] = op[2]
        elif kind == "truncate":
            del out[at:]
        elif kind == "extend":
            out += op[1]
        elif kind == "insert":
            out[at:at] = op[2]
        elif kind == "delete":
            del out[at:at + op[2]]
        elif kind == "context-length" and len(out) >= 46:
            out[44:46] = struct.pack(">H", op[1])
    return bytes(out)


@pytest.fixture(scope="module")
def fuzz_file(env: Env) -> tuple[Path, Path, bytes, bytes]:
    """(mount path, backing path, content, header) of a file in a directory with a context."""
    d = env.m.path / "hdr-fuzz"
    d.mkdir()
    os.setxattr(d, CONTEXT, HDR_CONTEXT)
    content = os.urandom(HDR_SIZE)
    (d / "victim").write_bytes(content)
    backing = env.store.backing / "hdr-fuzz" / "victim"
    return d / "victim", backing, content, os.getxattr(backing, HEADER)


@settings(FUZZ, max_examples=100)
@given(ops=mutations)
def test_random_header_mutations_give_eio_or_the_right_data(env, fuzz_file, ops):
    path, backing, content, original = fuzz_file
    raw = mutate_header(original, ops)
    assume(len(raw) < 3900)  # what ext4 takes as one xattr value
    wait_no_open_files(env.m)
    mark = log_mark(env.m)
    os.setxattr(backing, HEADER, raw)
    try:
        with no_hang(env.m, "reading a file with a mutated header"):
            code, data = read_errno(path)
        if raw == original:
            assert (code, data) == (None, content)
        else:
            assert code == EIO, errno_name(code)
            assert logged_about(env.m, mark, backing), "no log line names the file"
    finally:
        os.setxattr(backing, HEADER, original)
    assert env.m.proc is not None and env.m.proc.poll() is None
    new = log_since(env.m, mark)
    assert "unexpected error" not in new and "Traceback" not in new, new[-5000:]


# ====================================================================== 3. names and paths


def names_dir(env: Env, name: str) -> tuple[Path, Path]:
    """A fresh directory on the mount and its backing twin."""
    d = env.m.path / name
    d.mkdir()
    return d, env.store.backing / name


odd_names = st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n
                                                       and n not in (b".", b".."))
_example_counter = iter(range(1 << 30))


@FUZZ
@given(name=odd_names, other=odd_names, size=st.integers(0, 3 * 4096))
def test_any_name_of_up_to_255_bytes_round_trips(env, name, other, size):
    """Random bytes as names: non-UTF-8, newlines, control characters, 255 bytes."""
    assume(name != other)
    d, backing = names_dir(env, f"names-{next(_example_counter)}")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    content = os.urandom(size)
    try:
        with no_hang(env.m, f"working on the name {name!r}"):
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
            assert os.listdir(os.fsencode(d)) == [name]
            assert os.listdir(os.fsencode(backing)) == [name]
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            try:
                assert os.read(fd, size + 1) == content
            finally:
                os.close(fd)
            os.setxattr(os.fsencode(d) + b"/" + name, b"user.odd\xff" + name[:100], name)
            assert os.getxattr(os.fsencode(d) + b"/" + name, b"user.odd\xff" + name[:100]) == name
            os.rename(name, other, src_dir_fd=dfd, dst_dir_fd=dfd)
            assert os.listdir(os.fsencode(d)) == [other]
            os.mkdir(name, dir_fd=dfd)
            os.symlink(name, os.fsencode(d) + b"/" + name + b"/" + name[:200])
            assert os.readlink(os.fsencode(d) + b"/" + name + b"/" + name[:200]) == name
            assert sorted(os.listdir(os.fsencode(backing))) == sorted([name, other])
            os.unlink(os.fsencode(d) + b"/" + name + b"/" + name[:200])
            os.rmdir(name, dir_fd=dfd)
            os.unlink(other, dir_fd=dfd)
            assert os.listdir(os.fsencode(d)) == []
    finally:
        os.close(dfd)
    os.rmdir(d)


LONG_NAMES = {
    "ascii": b"a" * 255,
    "utf8-two-byte": "é".encode() * 127 + b"x",
    "utf8-four-byte": "𝄞".encode() * 63 + b"xyz",
    "not-utf8": b"\xff\xfe" * 127 + b"\x80",
    "newlines": b"\n" * 255,
    "control-characters": bytes(range(1, 32)) * 8 + b"x" * 7,
}


@pytest.mark.parametrize("kind", LONG_NAMES)
def test_255_byte_names_work_and_256_bytes_are_enametoolong(env, kind):
    name = LONG_NAMES[kind]
    assert len(name) == 255
    d, backing = names_dir(env, f"long-{kind}")
    base = os.fsencode(d) + b"/"
    mark = log_mark(env.m)
    with no_hang(env.m, f"255-byte {kind} names"):
        (Path(os.fsdecode(base + name))).write_bytes(b"long name")
        assert Path(os.fsdecode(base + name)).read_bytes() == b"long name"
        os.mkdir(base + name[:-1] + b"D")
        os.symlink(name, base + name[:-1] + b"S")
        os.link(base + name, base + name[:-1] + b"L")
        os.rename(base + name, base + name[:-1] + b"R")
        assert sorted(os.listdir(base)) == sorted(name[:-1] + c for c in (b"D", b"S", b"L", b"R"))
        assert sorted(os.listdir(os.fsencode(backing))) == sorted(os.listdir(base))
        for length in (256, 1025, 4096):
            too_long = (name * 20)[:length]
            for op, args in [
                ("create", lambda n: os.open(base + n, os.O_CREAT | os.O_WRONLY, 0o644)),
                ("mkdir", lambda n: os.mkdir(base + n)),
                ("symlink", lambda n: os.symlink(b"target", base + n)),
                ("link", lambda n: os.link(base + name[:-1] + b"R", base + n)),
                ("rename", lambda n: os.rename(base + name[:-1] + b"R", base + n)),
                ("stat", lambda n: os.stat(base + n)),
                ("unlink", lambda n: os.unlink(base + n)),
            ]:
                with pytest.raises(OSError) as exc:
                    args(too_long)
                assert exc.value.errno == errno.ENAMETOOLONG, (op, length, exc.value)
        assert Path(os.fsdecode(base + name[:-1] + b"R")).read_bytes() == b"long name"
    shutil.rmtree(d)
    assert_healthy(env.m, mark)


def test_odd_names_in_the_control_directory_are_refused_cleanly(env):
    m = env.m
    keys = os.fsencode(ctl(m) / "keys") + b"/"
    before = key_state(m)
    mark = log_mark(m)
    cases: list[tuple[str, Callable[[], Any], set[int]]] = [
        ("lookup-not-utf8", lambda: os.stat(keys + b"\xff"), {errno.ENOENT}),
        # Key references are read as in "echo victim > default-key", surrounding
        # whitespace stripped: keys/"victim\n" may name victim, as its KeyId does.
        ("lookup-newline", lambda: os.stat(keys + b"victim\n"), {errno.ENOENT, None}),
        ("mkdir-not-utf8", lambda: os.mkdir(keys + b"\xffkey"), {errno.EINVAL}),
        ("mkdir-trailing-newline", lambda: os.mkdir(keys + b"newline\n"), {errno.EINVAL}),
        ("mkdir-inner-newline", lambda: os.mkdir(keys + b"new\nline"), {errno.EINVAL}),
        ("mkdir-255", lambda: os.mkdir(keys + b"k" * 255), {errno.EINVAL}),
        ("mkdir-256", lambda: os.mkdir(keys + b"k" * 256), {errno.ENAMETOOLONG, errno.EINVAL}),
        ("mkdir-control-characters", lambda: os.mkdir(keys + b"a\tb\x01"), {errno.EINVAL}),
        ("rename-to-not-utf8", lambda: os.rename(keys + b"victim", keys + b"\xff"), {errno.EINVAL}),
        ("rename-to-trailing-newline", lambda: os.rename(keys + b"victim", keys + b"renamed\n"), {errno.EINVAL}),
        ("rename-from-not-utf8", lambda: os.rename(keys + b"\xff", keys + b"fine"), {errno.ENOENT}),
        ("create-key-trailing-newline",
         lambda: transact(ctl(m) / "create-key", {"Alias": "newline\n"}), {errno.EINVAL}),
        ("create-key-lone-surrogate",
         lambda: transact(ctl(m) / "create-key", b'{"Alias": "\\udcff"}'), {errno.EINVAL}),
        ("open-not-utf8-file", lambda: os.open(os.fsencode(ctl(m)) + b"/st\xffatus", os.O_RDONLY), {errno.ENOENT}),
    ]
    for name, action, codes in cases:
        with no_hang(m, name):
            try:
                action()
                code = None
            except OSError as exc:
                code = exc.errno
        assert code in codes, (name, errno_name(code))
    assert key_state(m) == before
    assert sorted(os.listdir(keys)) == sorted(os.fsencode(a) for a in env.key_ids)
    assert_healthy(m, mark)


DEPTH = 30
LEVEL_NAME_BYTES = 200


def level_name(i: int) -> bytes:
    """200-byte names; every fifth is not UTF-8."""
    head = f"{i:02d}".encode()
    fill = b"\xff\xfe" if i % 5 == 4 else b"d"
    return (head + fill * LEVEL_NAME_BYTES)[:LEVEL_NAME_BYTES]


def descend(root: Path, names: list[bytes]) -> int:
    """An O_RDONLY descriptor of root/names[0]/names[1]/..., reached one level at a time."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def read_at(dir_fd: int, name: bytes) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_at(dir_fd: int, name: bytes, data: bytes) -> None:
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640, dir_fd=dir_fd)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def test_a_tree_deeper_than_path_max_works_through_directory_descriptors(store):
    names = [level_name(i) for i in range(DEPTH)]
    assert sum(len(n) + 1 for n in names) > 4096 * 1.4  # well past PATH_MAX
    m = store.mount()
    content = os.urandom(3 * 4096 + 7)
    mark = log_mark(m)
    top = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup(top)
    try:
        with no_hang(m, "building the deep tree"):
            for i, name in enumerate(names):
                os.mkdir(name, 0o755, dir_fd=fd)
                if i == 3:  # a context set high up reaches files 26 levels further down
                    os.setxattr(f"/proc/self/fd/{fd}", CONTEXT, b'{"depth":"deep"}')
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            with pytest.raises(OSError) as exc:  # the long path itself is refused, by the kernel
                os.stat(os.fsencode(m.path) + b"/" + b"/".join(names))
            assert exc.value.errno == errno.ENAMETOOLONG
            write_at(fd, b"bottom", content)
            assert read_at(fd, b"bottom") == content
            assert os.getxattr(f"/proc/self/fd/{fd}/bottom", CONTEXT) == b'{"depth":"deep"}'
            write_at(fd, b"doomed\n\xff", b"short-lived")
            os.unlink(b"doomed\n\xff", dir_fd=fd)
            os.rename(b"bottom", b"renamed \xff", src_dir_fd=fd, dst_dir_fd=fd)
            write_at(fd, b"to-the-top", b"moved up 30 levels")
            os.rename(b"to-the-top", b"from-the-bottom", src_dir_fd=fd, dst_dir_fd=top)
            # Rename a directory half-way down while a descriptor below it is held.
            mid = descend(m.path, names[:14])
            try:
                os.rename(names[14], names[14][:-1] + b"R", src_dir_fd=mid, dst_dir_fd=mid)
            finally:
                os.close(mid)
            names[14] = names[14][:-1] + b"R"
            assert [os.fsencode(n) for n in os.listdir(fd)] == [b"renamed \xff"]
            assert read_at(fd, b"renamed \xff") == content
    finally:
        os.close(fd)
        os.close(top)
    assert (m.path / "from-the-bottom").read_bytes() == b"moved up 30 levels"
    # The backing tree has it all, at the same depth, encrypted.
    bfd = descend(store.backing, names)
    try:
        assert [os.fsencode(n) for n in os.listdir(bfd)] == [b"renamed \xff"]
        backing_data = read_at(bfd, b"renamed \xff")
        assert len(backing_data) == ciphertext_size(len(content), DEFAULT_BLOCK_SIZE) and content[:64] not in backing_data
        header = parse_header(os.getxattr(f"/proc/self/fd/{bfd}/".encode() + b"renamed \xff", HEADER))
        assert header.context == b'{"depth":"deep"}'
    finally:
        os.close(bfd)
    assert_healthy(m, mark)
    m.unmount()
    result = store.kmsfs("fsck", str(store.backing))
    assert result.stdout.rstrip().endswith("2 files, " + f"{len(backing_data) + 46} bytes checked: clean"), result.stdout
    # A new daemon (which looks for headers at mount) finds it all again.
    m2 = store.mount()
    fd = descend(m2.path, names)
    try:
        assert read_at(fd, b"renamed \xff") == content
    finally:
        os.close(fd)


def test_fsck_reports_damaged_files_with_odd_names(store):
    """fsck names damaged files whatever bytes their names hold, in text and JSON, without a traceback."""
    m = store.mount()
    odd = [b"plain", b"new\nline", b"\xff\xfe not utf-8", "ütf-8 é".encode(), b"tab\there"]
    for name in odd:
        Path(os.fsdecode(os.fsencode(m.path) + b"/" + name)).write_bytes(os.urandom(5000))
    m.unmount()
    for name in odd[1:]:
        path = os.fsencode(store.backing) + b"/" + name
        with open(path, "r+b") as fh:
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(bytes([byte[0] ^ 1]))
    # As under a UTF-8 locale such as en_US.UTF-8: output that is not UTF-8 raises.
    env = {**store.env, "PYTHONIOENCODING": "utf-8:strict", "PYTHONUTF8": "0"}
    for args in (["fsck"], ["fsck", "--json"]):
        result = subprocess.run([sys.executable, "-m", "kmsfs", *args, str(store.backing)],
                                capture_output=True, env=env, timeout=120, check=False)
        out, err = result.stdout, result.stderr
        assert result.returncode == 4, (args, out, err)
        assert b"Traceback" not in err, err.decode("utf-8", "replace")
        if "--json" in args:
            report = json.loads(out)
            damaged = {os.fsencode(d["path"]) for d in report["damaged"]}
            assert damaged == set(odd[1:]), damaged
        else:
            # One line per damaged file: a name cannot break a line or forge another one.
            lines = out.decode().splitlines()
            assert len([line for line in lines if "tampered block" in line]) == len(odd) - 1, out
            for shown in ("new\\nline", "\\xff\\xfe not utf-8", "ütf-8 é", "tab\\there"):
                assert any(line.startswith(shown + ": tampered block") for line in lines), (shown, lines)


# ====================================================================== 4. other users


U = OTHER_UID  # the other user (and its group), with no supplementary groups
STRANGER = 4321  # owns files and groups that U has no part in

PERM_SCRIPT = r"""
import errno, json, os, stat, subprocess, sys

base = sys.argv[1]
os.umask(0o027)

def p(rel):
    return os.path.join(base, rel)

def owner(rel):
    st = os.lstat(p(rel))
    return [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]

def run(op, rel, *args):
    if op == "read":
        with open(p(rel), "rb") as fh:
            fh.read()
    elif op == "write":
        fd = os.open(p(rel), os.O_WRONLY)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    elif op == "rdwr":
        os.close(os.open(p(rel), os.O_RDWR))
    elif op == "rdwr-write":  # through the page cache, where write-only opens are direct
        fd = os.open(p(rel), os.O_RDWR)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    elif op == "append":
        fd = os.open(p(rel), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"appended")
        finally:
            os.close(fd)
    elif op == "truncate":
        os.truncate(p(rel), 1)
    elif op == "open-trunc":
        os.close(os.open(p(rel), os.O_WRONLY | os.O_TRUNC))
    elif op == "create":
        fd = os.open(p(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, args[0])
        try:
            os.write(fd, b"new")
        finally:
            os.close(fd)
        return owner(rel)
    elif op == "create-empty":  # no write: a write would clear a set-user-ID bit anyway
        os.close(os.open(p(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, args[0]))
        return owner(rel)
    elif op == "open-creat":
        os.close(os.open(p(rel), os.O_CREAT | os.O_WRONLY, 0o666))
    elif op == "mkdir":
        os.mkdir(p(rel), args[0])
        return owner(rel)
    elif op == "mkfifo":
        os.mkfifo(p(rel), 0o666)
        return owner(rel)
    elif op == "symlink":
        os.symlink(args[0], p(rel))
        return owner(rel)[:2]
    elif op == "link":
        os.link(p(rel), p(args[0]))
    elif op == "unlink":
        os.unlink(p(rel))
    elif op == "rmdir":
        os.rmdir(p(rel))
    elif op == "rename":
        os.rename(p(rel), p(args[0]))
    elif op == "chmod":
        os.chmod(p(rel), args[0])
        return owner(rel)
    elif op == "chown":
        os.chown(p(rel), args[0], args[1])
        return owner(rel)
    elif op == "utime-now":
        os.utime(p(rel))
    elif op == "utime-set":
        os.utime(p(rel), (1, 1))
    elif op == "listdir":
        return sorted(os.listdir(p(rel)))
    elif op == "stat":
        return owner(rel)
    elif op == "readlink":
        return os.readlink(p(rel))
    elif op == "setxattr":
        os.setxattr(p(rel), "user.test", b"set by U")
    elif op == "getxattr":
        return os.getxattr(p(rel), "user.test").decode()
    elif op == "access":
        return [os.access(p(rel), mode) for mode in (os.R_OK, os.W_OK, os.X_OK)]
    elif op == "exec":  # the files hold no program: ENOEXEC once the execute check passed
        return subprocess.run([p(rel)], capture_output=True, check=False).returncode
    elif op == "chdir":
        os.chdir(p(rel))
        os.chdir(base)
    else:
        raise ValueError(op)

results = []
for op in json.loads(sys.argv[2]):
    try:
        results.append(["ok", run(*op)])
    except OSError as exc:
        results.append([errno.errorcode.get(exc.errno, str(exc.errno)), None])
print(json.dumps(results))
"""


def as_root(base: Path, ops: list[tuple[Any, ...]]) -> list[list[Any]]:
    result = subprocess.run([USER_PYTHON, "-c", PERM_SCRIPT, str(base), json.dumps(ops)], capture_output=True,
                            text=True, timeout=120, cwd="/", check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def super_options(mountpoint: Path) -> set[str]:
    """The filesystem's own options in /proc/self/mountinfo (FUSE's are there)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return set(fields[-1].split(","))
    raise AssertionError(f"{mountpoint} is not in /proc/self/mountinfo")


def as_other_user(base: Path, ops: list[tuple[Any, ...]]) -> list[list[Any]]:
    result = subprocess.run(
        ["setpriv", f"--reuid={U}", f"--regid={U}", "--clear-groups", USER_PYTHON, "-c", PERM_SCRIPT, str(base),
         json.dumps(ops)], capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def build_layout(base: Path) -> None:
    """The same tree, as root, on the mount and on ext4."""
    base.mkdir()
    os.chmod(base, 0o755)

    def f(rel: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        (base / rel).write_bytes(b"content of " + rel.encode())
        os.chown(base / rel, uid, gid)
        os.chmod(base / rel, mode)

    def d(rel: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        (base / rel).mkdir()
        os.chown(base / rel, uid, gid)
        os.chmod(base / rel, mode)

    for mode in (0o600, 0o640, 0o644, 0o666):
        f(f"r{mode:o}", mode)
    for mode in (0o600, 0o640, 0o644, 0o444):
        f(f"u{mode:o}", mode, U, U)
    f("g640", 0o640, 0, U)
    f("g604", 0o604, 0, U)  # U's group may not read, though others may: group bits apply
    for name in ("r600", "r644", "u644"):
        os.setxattr(base / name, "user.test", b"set by root")
    d("rootdir", 0o755)
    f("rootdir/file", 0o644)
    d("private", 0o700)
    f("private/file", 0o644)
    d("xonly", 0o711)
    f("xonly/file", 0o644)
    d("open", 0o777)
    d("sticky", 0o1777)
    f("sticky/rootfile", 0o666)
    f("sticky/userfile", 0o644, U, U)
    f("sticky/strangerfile", 0o666, STRANGER, STRANGER)
    d("sticky/rootdir", 0o755)
    d("userdir", 0o755, U, U)
    f("userdir/file", 0o644, U, U)
    d("sgid", 0o2777, 0, STRANGER)  # setgid, of a group U is not in
    d("ugid", 0o2777, 0, U)  # setgid, of U's own group
    # Set-id files that U may write: which bits a write drops, for a write-only
    # open (direct to kmsfs) and a read-write one (through the cache), and which
    # a truncate and an open with O_TRUNC drop.
    for how in SET_ID_CHANGES:
        f(f"setid-{how}-suid", 0o4777)
        f(f"setid-{how}-sgid-x", 0o2777)  # group-executable: dropped
        f(f"setid-{how}-sgid-nox", 0o2666)  # not group-executable, U not in the group: dropped
        f(f"setid-{how}-sgid-nox-own", 0o2666, 0, U)  # U's own group: kept
        f(f"setid-{how}-both", 0o6777, 0, U)


#: How U changes each set-id file, by the infix of its name.
SET_ID_CHANGES = {"w": "write", "rw": "rdwr-write", "t": "truncate", "o": "open-trunc"}
SET_ID_KINDS = ("suid", "sgid-x", "sgid-nox", "sgid-nox-own", "both")

PERMISSION_OPS: list[tuple[Any, ...]] = [
    ("read", "r600"), ("read", "r640"), ("read", "r644"), ("write", "r644"), ("rdwr", "r644"),
    ("write", "r666"), ("append", "r666"), ("read", "u600"), ("write", "u600"), ("write", "u444"),
    ("rdwr", "u444"), ("read", "g640"), ("read", "g604"), ("truncate", "r644"), ("truncate", "r666"),
    ("truncate", "u600"), ("access", "r640"), ("access", "u600"), ("access", "g604"),
    ("getxattr", "r600"), ("getxattr", "r644"), ("getxattr", "u644"), ("setxattr", "r644"), ("setxattr", "u644"),
    ("listdir", "private"), ("stat", "private/file"), ("read", "private/file"),
    ("listdir", "xonly"), ("stat", "xonly/file"), ("read", "xonly/file"),
    ("mkdir", "rootdir/new", 0o777), ("create", "rootdir/newfile", 0o666), ("unlink", "rootdir/file"),
    ("mkdir", "open/newdir", 0o777), ("create", "open/newfile", 0o666), ("create", "open/private", 0o600),
    ("create", "open/executable", 0o777), ("create-empty", "open/setuid", 0o4755),
    ("create-empty", "open/setgid", 0o2755), ("create", "open/written-setuid", 0o4755),
    ("mkfifo", "open/fifo"), ("symlink", "open/symlink", "../r600"), ("readlink", "open/symlink"),
    ("read", "open/symlink"), ("link", "r644", "open/hardlink-of-root-file"),
    ("link", "u644", "open/hardlink-of-own-file"), ("stat", "open/hardlink-of-own-file"),
    ("unlink", "sticky/rootfile"), ("unlink", "sticky/strangerfile"), ("rmdir", "sticky/rootdir"),
    ("rename", "sticky/rootfile", "sticky/moved"), ("rename", "sticky/userfile", "sticky/moved"),
    ("open-creat", "sticky/strangerfile"), ("unlink", "sticky/moved"),
    ("rename", "u644", "rootdir/u644"), ("rename", "open/newfile", "open/renamed"),
    ("rename", "userdir/file", "open/from-userdir"),
    ("chmod", "r644", 0o666), ("chmod", "u644", 0o600), ("chmod", "u640", 0o2755), ("chmod", "u600", 0o4700),
    ("chown", "u644", 0, -1), ("chown", "u644", -1, 0), ("chown", "u644", U, U), ("chown", "r644", U, -1),
    ("chown", "u640", -1, STRANGER),
    ("utime-now", "r644"), ("utime-set", "r644"), ("utime-now", "r666"), ("utime-set", "r666"),
    ("utime-set", "u600"),
    ("mkdir", "sgid/subdir", 0o777), ("create", "sgid/file", 0o666), ("create", "sgid/setgid-file", 0o2777),
    ("stat", "sgid/subdir"), ("mkdir", "sgid/subdir/deeper", 0o755), ("create", "sgid/subdir/file", 0o644),
    ("mkdir", "ugid/subdir", 0o700), ("create-empty", "ugid/setgid-file", 0o2755),
    ("create-empty", "sgid/setgid-file-2", 0o2755),
    ("rmdir", "open/newdir"), ("unlink", "userdir/file"), ("rmdir", "userdir"), ("listdir", "open"),
    ("stat", "open/setuid"), ("stat", "open/setgid"), ("stat", "u600"), ("stat", "u640"),
    *[(op, f"setid-{how}-{kind}") for how, change in SET_ID_CHANGES.items()
      for kind in SET_ID_KINDS for op in (change, "stat")],
]


@pytest.fixture
def plain_dir() -> Iterator[Path]:
    """A directory on the backing store's filesystem (ext4 here) that every uid can reach."""
    base = Path(tempfile.mkdtemp(prefix="kmsfs-hostile-ext4-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def compare(ops: list[tuple[Any, ...]], on_mount: list[list[Any]], on_ext4: list[list[Any]]) -> list[str]:
    return [f"{op}: kmsfs {got} / ext4 {want}" for op, got, want in zip(ops, on_mount, on_ext4) if got != want]


#: Root's table: the other user's, then execute checks, which root does not pass
#: on a regular file without an execute bit, and the directories' modes.
ROOT_OPS: list[tuple[Any, ...]] = [
    *PERMISSION_OPS,
    *[("access", rel) for rel in ("r600", "u444", "open/executable", "setid-w-suid", "private", "xonly", "sticky")],
    *[("exec", rel) for rel in ("r644", "u600", "open/executable", "setid-t-sgid-x")],
    ("chdir", "private"), ("chdir", "xonly"),
    ("chmod", "r600", 0o000), ("access", "r600"), ("read", "r600"), ("write", "r600"),
    ("chmod", "private", 0o000), ("chdir", "private"), ("listdir", "private"), ("access", "private"),
]


def test_root_alone_mount_answers_as_ext4_without_default_permissions(store, plain_dir):
    """Root's mount for root alone leaves out default_permissions (it saves a GETATTR
    per create); the kernel and kmsfs's access() must still answer as ext4 does."""
    if os.geteuid() != 0:
        pytest.skip("a mount without default_permissions is made only by root")
    with open_mountpoint() as mountpoint:  # one that fsuid U below can reach
        m = store.mount(mountpoint)
        try:
            _root_table_checks(store, m, plain_dir)
        finally:
            m.cleanup()


def _root_table_checks(store: Store, m: Mount, plain_dir: Path) -> None:
    assert "default_permissions" not in super_options(m.path)
    assert os.stat(plain_dir).st_dev == os.stat(store.backing).st_dev, "not on the backing filesystem"
    build_layout(m.path / "perm")
    build_layout(plain_dir / "perm")
    with no_hang(m, "root's permission table"):
        on_mount = as_root(m.path / "perm", ROOT_OPS)
    on_ext4 = as_root(plain_dir / "perm", ROOT_OPS)
    assert len(on_mount) == len(ROOT_OPS)
    assert not compare(ROOT_OPS, on_mount, on_ext4), "\n".join(compare(ROOT_OPS, on_mount, on_ext4))
    results = dict(zip(map(tuple, ROOT_OPS), on_mount))
    assert results[("access", "u444")] == ["ok", [True, True, False]]
    assert results[("access", "open/executable")] == ["ok", [True, True, True]]
    assert results[("exec", "r644")][0] == "EACCES"
    assert results[("exec", "open/executable")][0] == "ENOEXEC"
    assert results[("access", "private")] == ["ok", [True, True, True]]
    # The control directory: searchable, its files readable or writable, none executable.
    control = m.path / ".kmsfs"
    assert [os.access(control, mode) for mode in (os.R_OK, os.W_OK, os.X_OK)] == [True, True, True]
    assert [os.access(control / "status", mode) for mode in (os.R_OK, os.X_OK)] == [True, False]
    # The one request that carries another file-system uid without FUSE keeping its
    # process out: a root process's chdir(2) after setfsuid(2).  access(2) cannot:
    # it checks with the real ids.
    fsuid_chdir = textwrap.dedent(f"""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setfsuid({U}); libc.setfsgid({U})
        results = []
        for rel in ("private", "xonly", "ugid/subdir", "rootdir/new", "rootdir/other-group"):
            try:
                os.chdir(os.path.join(sys.argv[1], rel))
                results.append("ok")
            except OSError as exc:
                results.append(exc.errno)
        print(results)
    """)
    for base in (m.path, plain_dir):
        os.chown(base / "perm" / "rootdir" / "new", U, U)  # U's, mode 0750: the owner class
        os.mkdir(base / "perm" / "rootdir" / "other-group", 0o705)
        os.chown(base / "perm" / "rootdir" / "other-group", 0, U)  # U's group may not, others may
    chdirs = [subprocess.run([USER_PYTHON, "-c", fsuid_chdir, str(base / "perm")], capture_output=True, text=True,
                             timeout=60, check=True).stdout for base in (m.path, plain_dir)]
    # private is 0000, xonly 0711, ugid/subdir 2700 in U's group, rootdir/new U's own
    # 0750, rootdir/other-group 0705 in U's group: the group's bits, not the others'.
    eacces = errno.EACCES
    assert chdirs[0] == chdirs[1] == f"[{eacces}, 'ok', {eacces}, 'ok', {eacces}]\n", chdirs
    # A process whose ids are not all root's is kept out by FUSE itself.
    denied = subprocess.run(["setpriv", "--regid=1", "--clear-groups", USER_PYTHON, "-c",
                             f"import os; os.stat({str(m.path / 'perm' / 'r644')!r})"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stderr
    assert_healthy(m, 0)


def test_permissions_ownership_and_modes_match_ext4_for_another_user(env, plain_dir):
    require_other_uid()
    m = env.m
    assert "allow_other" in m.options
    assert "default_permissions" in super_options(m.path)  # the kernel checks every access
    # The reference is the filesystem kmsfs passes through to (ext4 here).
    assert os.stat(plain_dir).st_dev == os.stat(env.store.backing).st_dev, "not on the backing filesystem"
    mark = log_mark(m)
    write_ctl(kpath(m, "kmsfs-default", "grants"), f"uid:{U} use\n")
    try:
        build_layout(m.path / "perm")
        build_layout(plain_dir / "perm")
        with no_hang(m, "the permission table"):
            on_mount = as_other_user(m.path / "perm", PERMISSION_OPS)
        on_ext4 = as_other_user(plain_dir / "perm", PERMISSION_OPS)
    finally:
        write_ctl(kpath(m, "kmsfs-default", "grants"), "\n")
    assert len(on_mount) == len(PERMISSION_OPS)
    assert not compare(PERMISSION_OPS, on_mount, on_ext4), "\n".join(compare(PERMISSION_OPS, on_mount, on_ext4))
    # What the table must show, on both: new files are U's, with the umask applied,
    # and setgid directories pass their group (and, to directories, the bit) on.
    results = dict(zip(map(tuple, PERMISSION_OPS), on_mount))
    assert results[("create", "open/newfile", 0o666)] == ["ok", [U, U, "0o640"]]
    assert results[("mkdir", "open/newdir", 0o777)] == ["ok", [U, U, "0o750"]]
    assert results[("create-empty", "open/setuid", 0o4755)] == ["ok", [U, U, "0o4750"]]
    assert results[("create-empty", "open/setgid", 0o2755)] == ["ok", [U, U, "0o2750"]]
    assert results[("create", "open/written-setuid", 0o4755)] == ["ok", [U, U, "0o750"]]  # the write cleared it
    assert results[("mkdir", "sgid/subdir", 0o777)] == ["ok", [U, STRANGER, "0o2750"]]
    assert results[("create", "sgid/file", 0o666)] == ["ok", [U, STRANGER, "0o640"]]
    assert results[("create", "sgid/setgid-file", 0o2777)] == ["ok", [U, STRANGER, "0o750"]]
    assert results[("read", "r600")][0] == "EACCES" and results[("unlink", "sticky/rootfile")][0] == "EPERM"
    # A write or truncate drops set-user-ID, and set-group-ID unless the group
    # may not execute and the writer is in it, whichever way the file was opened.
    for how in SET_ID_CHANGES:
        modes = {kind: results[("stat", f"setid-{how}-{kind}")][1][2] for kind in SET_ID_KINDS}
        assert modes == {"suid": "0o777", "sgid-x": "0o777", "sgid-nox": "0o666", "sgid-nox-own": "0o2666",
                         "both": "0o777"}, how
    # The backing files belong to U as well, and the content is there, encrypted.
    st = os.stat(env.store.backing / "perm" / "open" / "renamed")
    assert (st.st_uid, st.st_gid) == (U, U)
    assert b"new" not in (env.store.backing / "perm" / "open" / "renamed").read_bytes()
    assert (m.path / "perm" / "open" / "renamed").read_bytes() == b"new"
    assert_healthy(m, mark)


GRANT_OPS: list[tuple[Any, ...]] = [
    ("read", "u644"), ("read", "u600"), ("write", "u644"), ("truncate", "u600"), ("append", "u644"),
    ("open-creat", "u644"), ("create", "open/newfile", 0o644), ("read", "r644"), ("read", "r600"),
    # Names, attributes and directories need no key.
    ("stat", "u644"), ("listdir", "open"), ("mkdir", "open/dir", 0o755), ("chmod", "u644", 0o640),
    ("rename", "u600", "open/moved"), ("symlink", "open/link", "../u644"), ("getxattr", "u644"),
    ("setxattr", "u644"), ("unlink", "open/link"),
]
#: Operations on file content: without a grant they fail with EACCES whatever the mode bits say.
CONTENT_OPS = {"read", "write", "rdwr", "truncate", "append", "open-creat", "create"}


def test_grants_apply_on_top_of_the_mode_bits(env, plain_dir):
    require_other_uid()
    m = env.m
    mark = log_mark(m)
    build_layout(m.path / "grants")
    build_layout(plain_dir / "grants")
    write_ctl(kpath(m, "kmsfs-default", "grants"), "\n")  # no grant at all
    with no_hang(m, "the grant table"):
        on_mount = as_other_user(m.path / "grants", GRANT_OPS)
    on_ext4 = as_other_user(plain_dir / "grants", GRANT_OPS)
    for op, got, want in zip(GRANT_OPS, on_mount, on_ext4):
        if op[0] in CONTENT_OPS:
            assert got == ["EACCES", None], (op, got, want)
        else:  # the same errno (listings differ: no file was created on the mount)
            assert got[0] == want[0], (op, got, want)
    assert on_ext4[0] == ["ok", None]  # the mode bits alone allow it
    assert not (m.path / "grants" / "open" / "newfile").exists()
    # A grant to U's group is enough; and a use grant on another key gives nothing.
    write_ctl(kpath(m, "victim", "grants"), f"uid:{U} admin\n")
    try:
        assert as_other_user(m.path / "grants", [("read", "u644")]) == [["EACCES", None]]
    finally:
        write_ctl(kpath(m, "victim", "grants"), "uid:4321 use\ngid:4321 admin\n")
    write_ctl(kpath(m, "kmsfs-default", "grants"), f"gid:{U} use\n")
    try:
        assert as_other_user(m.path / "grants", [("read", "u644"), ("create", "open/newfile", 0o644)]) == \
            [["ok", None], ["ok", [U, U, "0o640"]]]
    finally:
        write_ctl(kpath(m, "kmsfs-default", "grants"), "\n")
    denied = [json.loads(line) for line in (ctl(m) / "audit.log").read_bytes().splitlines()
              if b'"denied"' in line and f'"uid": {U}'.encode() in line]
    assert {e["operation"] for e in denied} >= {"OpenFile", "CreateFile"}
    assert_healthy(m, mark)


# ====================================================================== 5. stress-ng


#: Stressors of stress-ng's filesystem class (and mmap of a file) that work on
#: what a FUSE filesystem offers, each with --verify where it has one.  Left out:
#:   fallocate, fpunch, fsize: kmsfs has no fallocate (FUSE answers EOPNOTSUPP), so
#:       they do no work (fsize only reports that fallocate "unexpectedly succeeded");
#:   fiemap, chattr, inode-flags, file-ioctl, verity: ioctls FUSE does not pass to
#:       kmsfs (stress-ng skips fiemap itself);
#:   flock, lockf, locka, lockofd, lease, dnotify, inotify, fanotify: handled by the
#:       kernel alone, kmsfs never sees them;
#:   iomix, io: drop the page cache of, or sync(), the whole machine;
#:   getdent, open, bind-mount, binderfs, procfs, handle, dup, eventfd, chdir, access,
#:       ioprio: work on /proc, /dev and the like, not on the filesystem under --temp-path.
STRESSORS: list[tuple[str, int, list[str]]] = [
    ("hdd", 2, ["--hdd-bytes", "16M", "--hdd-opts", "rd-rnd"]),
    ("seek", 1, ["--seek-size", "16M"]),
    ("readahead", 1, ["--readahead-bytes", "4M"]),
    ("mmap", 1, ["--mmap-file", "--mmap-bytes", "4M"]),
    ("sync-file", 1, ["--sync-file-bytes", "8M"]),
    ("copy-file", 1, []),
    ("dentry", 1, []), ("dir", 1, []), ("dirdeep", 1, []), ("rename", 1, []), ("link", 1, []), ("symlink", 1, []),
    ("filename", 1, []), ("xattr", 1, []), ("chmod", 1, []), ("chown", 1, []), ("utime", 1, []),
    ("touch", 1, []), ("mknod", 1, []), ("fcntl", 1, []),
    ("fstat", 1, ["--fstat-dir", "{work}"]),
]
#: These move file data or names constantly: each must have done real work.
MUST_WORK = {"hdd", "seek", "readahead", "dentry", "dir", "rename", "touch"}
STRESS_SECONDS = 15


def require_stress_ng() -> str:
    path = shutil.which("stress-ng")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "stress-ng"], capture_output=True, timeout=300, check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("stress-ng")
    if path is None:
        message = "needs stress-ng (Debian package stress-ng), which could not be installed"
        if IN_CI:
            pytest.fail(f"CI=true and this test {message}", pytrace=False)
        pytest.skip(message)
    return path


def test_stress_ng_filesystem_stressors_pass_and_the_daemon_survives(store):
    stress_ng = require_stress_ng()
    m = store.mount()
    work = m.path / "stress"
    work.mkdir()
    keep = m.path / "kept-through-the-storm"
    kept = os.urandom(100_000)
    keep.write_bytes(kept)
    cmd = [stress_ng, "--verify", "--timeout", f"{STRESS_SECONDS}s", "--temp-path", str(work), "--metrics-brief"]
    for name, instances, options in STRESSORS:
        cmd += [f"--{name}", str(instances), *(option.format(work=work) for option in options)]
    mark = log_mark(m)
    started = time.monotonic()
    with no_hang(m, "stress-ng", seconds=STRESS_SECONDS + 60):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=STRESS_SECONDS + 60, cwd=work,
                                check=False)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "successful run completed" in output and "unsuccessful" not in output, output
    failures = [line for line in output.splitlines() if re.search(r"\bfail", line, re.IGNORECASE)]
    assert not failures, "\n".join(failures)
    ops = {}
    for line in output.splitlines():
        match = re.match(r"stress-ng: metrc: \[\d+\] ([a-z-]+)\s+(\d+)\s+[\d.]+\s", line)
        if match:
            ops[match[1]] = int(match[2])
    assert set(ops) == {name for name, _, _ in STRESSORS}, (sorted(ops), output)
    idle = sorted(name for name in MUST_WORK if ops[name] == 0)
    assert not idle, f"stressors that did nothing: {idle}\n{output}"
    assert elapsed < STRESS_SECONDS + 45, elapsed
    # The daemon is alive, serves files, kept what was there and logged nothing unexpected.
    assert keep.read_bytes() == kept
    assert_healthy(m, mark)
    assert not os.listdir(work), "stress-ng left files behind"
    m.unmount()
    fsck = store.kmsfs("fsck", str(store.backing))
    assert "clean" in fsck.stdout, fsck.stdout
