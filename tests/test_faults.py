"""The daemon never dies, and HSM faults fail only what needs the HSM.

Faults are provoked for real, never mocked:

* ``keys.json`` replaced behind the daemon's back by garbage of several
  kinds (and by a file that parses but makes the daemon's own code fail in
  an unexpected way): what needs the key registry fails with EIO, the rest
  of the mount keeps working, the daemon keeps running, and once the file is
  restored everything works again without a remount.
* The SoftHSM2 token disappears while mounted (its token directory is
  renamed away; SoftHSM2 then answers ObjectHandleInvalid, NoSuchKey and
  GeneralError through the real python-pkcs11 calls) and comes back: open
  files keep working on the DEK in memory; opening, creating, rewrapping and
  the small-data crypto of the control files fail with EIO; nothing is ever
  written without a wrapped key; names, attributes and listings keep
  working; and after the token is back the same mount serves everything.

The HSM faults refused at mount time are in test_cli_refusals.py.  scripts/soak
runs these tests with more outages and longer loads (KMSFS_SOAK_SCALE).
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import Mount, Store
from test_lifecycle import b64, create_key, errno_of, info, key_of, kpath, transact, unb64, write_ctl

pytestmark = pytest.mark.mount

B = 4096
HEADER_XATTR = "user.kmsfs"
#: scripts/soak runs these tests with more outages and longer loads.
SCALE = max(1.0, float(os.environ.get("KMSFS_SOAK_SCALE", "1")))


# ====================================================================== helpers


def fsck(store: Store) -> tuple[int, dict]:
    """``kmsfs fsck --json`` on the unmounted store: (exit status, report or {})."""
    result = store.kmsfs("fsck", "--json", str(store.backing), check=False)
    try:
        report = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    report.setdefault("stderr", result.stderr)
    return result.returncode, report


def assert_alive(m: Mount) -> None:
    assert m.proc is not None and m.proc.poll() is None, f"the daemon died:\n{m.log()[-4000:]}"


def log_lines(m: Mount, *words: str) -> list[str]:
    return [line for line in m.log().splitlines() if any(w in line for w in words)]


def direct_fd(path: Path, flags: int = os.O_RDWR) -> int:
    """An O_DIRECT descriptor: every read and write is a request to the daemon."""
    return os.open(path, flags | os.O_DIRECT)


def direct_read(fd: int, length: int, offset: int = 0) -> bytes:
    buf = mmap.mmap(-1, max(B, -(-length // B) * B))
    n = os.preadv(fd, [buf], offset)
    return bytes(buf[:min(n, length)])


def direct_write(fd: int, data: bytes, offset: int = 0) -> None:
    assert len(data) % B == 0 and offset % B == 0
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    assert os.pwritev(fd, [buf], offset) == len(data)


def backing_names(store: Store, rel: str = "") -> set[str]:
    return set(os.listdir(store.backing / rel)) if rel else {
        n for n in os.listdir(store.backing) if n != ".kmsfs.d"}


@contextmanager
def token_gone(store: Store) -> Iterator[None]:
    """The SoftHSM2 token vanishes (its directory is renamed away) and comes back."""
    tokens = store.state_dir / "tokens"
    away = store.state_dir / "tokens.away"
    os.rename(tokens, away)
    try:
        yield
    finally:
        os.rename(away, tokens)


def replace_file(path: Path, data: bytes | None) -> None:
    """Replace ``path`` atomically (as an editor or a restore would), or remove it."""
    if data is None:
        path.unlink()
        return
    tmp = path.with_name(f".{path.name}.test-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ====================================================================== keys.json garbage

KEY_WATCH_WAIT = 0.8  # > KEY_WATCH_INTERVAL (0.5 s) + REVALIDATE_SECONDS (0.2 s)


def _garbage_variants(good: bytes) -> dict[str, bytes | None]:
    data = json.loads(good)
    # Parses, and is accepted by the registry, but makes the daemon's own code
    # fail in a way nobody planned for (a TypeError in the header code).
    for record in data["keys"]:
        if record["KeyId"] == data["default_key"]:
            record["CurrentVersion"] = "one"
    return {
        "binary": b"\xff\xfe\x00\x80garbage\x00" * 7,
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "not an object": b"[1, 2, 3]\n",
        "wrong types": b'{"default_key": 5, "keys": [1, "x"]}\n',
        "missing": None,
        "unexpected": (json.dumps(data, indent=2) + "\n").encode(),
    }


def test_garbage_keys_json_fails_only_what_needs_it_and_the_daemon_survives(store):
    m = store.mount()
    create_key(m, "proj")
    (m.path / "d").mkdir()
    contents = {"a": os.urandom(3 * B + 5), "d/b": os.urandom(10_000), "c": b"ccc" * 1000}
    for rel, data in contents.items():
        (m.path / rel).write_bytes(data)
    blob = transact(kpath(m, "kmsfs-default", "encrypt"), {"Plaintext": b64(b"secret")})["CiphertextBlob"]
    held = direct_fd(m.path / "a")  # opened before the damage: its DEK is in memory
    keys = store.backing / ".kmsfs.d" / "keys.json"
    good = keys.read_bytes()
    try:
        for number, (kind, garbage) in enumerate(_garbage_variants(good).items()):
            replace_file(keys, garbage)
            time.sleep(KEY_WATCH_WAIT)  # the key-state watcher polls the damaged file meanwhile
            assert_alive(m)
            # Nothing of this needs the registry: it all keeps working.
            assert sorted(os.listdir(m.path)) == [".kmsfs", "a", "c", "d"], kind
            assert (m.path / "d" / "b").stat().st_size == 10_000, kind
            os.rename(m.path / "c", m.path / "c2")
            os.rename(m.path / "c2", m.path / "c")
            (m.path / f"dir{number}").mkdir()
            os.symlink("a", m.path / f"dir{number}" / "link")
            os.chmod(m.path / "c", 0o600)
            os.setxattr(m.path / "c", "user.note", kind.encode())
            os.unlink(m.path / f"dir{number}" / "link")
            os.rmdir(m.path / f"dir{number}")
            assert (m.path / ".kmsfs" / "README").read_bytes().startswith(b"kmsfs control directory")
            if kind == "unexpected":
                # The registry reads fine: existing files open; only creating a
                # file runs into the bug, which becomes EIO with a traceback.
                assert (m.path / "d" / "b").read_bytes() == contents["d/b"]
                assert errno_of((m.path / "new").write_bytes, b"x") == errno.EIO
                assert "new" not in backing_names(store)
                assert log_lines(m, "unexpected error in create; answering EIO")
                assert "Traceback" in m.log()
            else:
                # Opening a file needs its key's record; creating needs the default key.
                assert errno_of((m.path / "d" / "b").read_bytes) == errno.EIO, kind
                assert errno_of((m.path / "new").write_bytes, b"x") == errno.EIO, kind
                assert "new" not in backing_names(store), kind
                # The held file's key state cannot be checked: EIO (or EACCES
                # when keys.json is missing, so its key is unknown).
                assert errno_of(direct_read, held, B) in (errno.EIO, errno.EACCES), kind
                if garbage is None:  # no keys.json reads as a registry without keys
                    assert json.loads((m.path / ".kmsfs" / "status").read_bytes())["keys"] == 0
                else:
                    assert errno_of((m.path / ".kmsfs" / "status").read_bytes) == errno.EIO, kind
            assert_alive(m)

            replace_file(keys, good)
            # Restored: everything works again, without a remount.
            for rel, data in contents.items():
                assert (m.path / rel).read_bytes() == data, (kind, rel)
            assert direct_read(held, len(contents["a"])) == contents["a"], kind
            (m.path / "new").write_bytes(kind.encode())
            assert (m.path / "new").read_bytes() == kind.encode()
            os.unlink(m.path / "new")
            assert json.loads((m.path / ".kmsfs" / "status").read_bytes())["keys"] == 2
            answer = transact(m.path / ".kmsfs" / "decrypt", {"CiphertextBlob": blob})
            assert unb64(answer["Plaintext"]) == b"secret"
        # The held file is still fully usable after all that.
        direct_write(held, b"H" * B, B)
        contents["a"] = contents["a"][:B] + b"H" * B + contents["a"][2 * B:]
        assert direct_read(held, len(contents["a"])) == contents["a"]
    finally:
        os.close(held)
        if (keys.read_bytes() if keys.exists() else None) != good:
            replace_file(keys, good)
    assert_alive(m)
    assert not log_lines(m, "main loop failed"), m.log()[-4000:]
    assert log_lines(m, "watching key states failed"), "the watcher never saw the damage"
    assert log_lines(m, "watching key states works again")
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report
    m = store.mount()
    for rel, data in contents.items():
        assert (m.path / rel).read_bytes() == data


# ====================================================================== HSM outage


def _outage_checks(store: Store, m: Mount, held: int, held_data: bytearray, contents: dict[str, bytes],
                   blob: str) -> None:
    """What must hold while the token is gone."""
    before_proj = info(m, "proj")
    headers = {rel: os.getxattr(store.backing / rel, HEADER_XATTR) for rel in contents}

    # An open file keeps working on the DEK in memory: read, write, truncate.
    assert direct_read(held, len(held_data)) == bytes(held_data)
    direct_write(held, b"W" * B, 2 * B)
    held_data[2 * B:3 * B] = b"W" * B
    assert direct_read(held, len(held_data)) == bytes(held_data)
    os.ftruncate(held, len(held_data) + 3 * B)  # grow through the daemon
    held_data.extend(bytes(3 * B))
    os.ftruncate(held, len(held_data) - B - 10)
    del held_data[len(held_data) - B - 10:]
    assert direct_read(held, len(held_data) + B) == bytes(held_data)

    # Opening a file that is not open needs the HSM: EIO, and nothing changes.
    assert errno_of((m.path / "closed").read_bytes) == errno.EIO
    assert errno_of(os.open, m.path / "closed", os.O_WRONLY | os.O_TRUNC) == errno.EIO
    assert errno_of(os.truncate, m.path / "d" / "b", 5) == errno.EIO

    # Creating needs a wrapped DEK: EIO, and no file is left behind.
    assert errno_of((m.path / "new").write_bytes, b"new data") == errno.EIO
    assert errno_of(os.mknod, m.path / "node", stat.S_IFREG | 0o644) == errno.EIO
    assert errno_of((m.path / "d" / "new").write_bytes, b"") == errno.EIO
    for name in ("new", "node", "d/new"):
        assert not (m.path / name).exists() and not (store.backing / name).exists(), name
    # An empty file without a header opens (no HSM needed); writing to it needs
    # a fresh wrapped DEK: EIO, and it stays empty, never non-empty without a header.
    fd = os.open(m.path / "headerless", os.O_WRONLY)
    try:
        assert errno_of(os.write, fd, b"data") == errno.EIO
    finally:
        os.close(fd)
    assert (store.backing / "headerless").stat().st_size == 0
    assert errno_of(os.getxattr, store.backing / "headerless", HEADER_XATTR) == errno.ENODATA

    # Names, attributes, listings and xattrs that are not keys need no HSM.
    assert sorted(os.listdir(m.path)) == sorted([".kmsfs", *{r.split("/")[0] for r in contents}, "headerless", "held"])
    assert (m.path / "closed").stat().st_size == len(contents["closed"])
    os.rename(m.path / "closed", m.path / "closed.moved")
    os.rename(m.path / "closed.moved", m.path / "closed")
    os.rename(m.path / "d", m.path / "d.moved")
    os.rename(m.path / "d.moved", m.path / "d")
    (m.path / "emptydir").mkdir()
    os.rmdir(m.path / "emptydir")
    os.chmod(m.path / "closed", 0o640)
    assert key_of(m.path / "closed")["Alias"] == "kmsfs-default"
    os.link(m.path / "closed", m.path / "closed.link")
    os.unlink(m.path / "closed.link")
    assert json.loads((m.path / ".kmsfs" / "status").read_bytes())["keys"] == len(os.listdir(m.path / ".kmsfs" / "keys"))

    # Moving a file to another key rewraps its DEK: EIO, the header stays.
    assert errno_of(os.setxattr, m.path / "closed", "user.kmsfs.key", b"proj") == errno.EIO
    # The KMS through the control files: every HSM call fails, the registry is untouched.
    assert errno_of(transact, kpath(m, "kmsfs-default", "encrypt"), {"Plaintext": b64(b"x")}) == errno.EIO
    assert errno_of(transact, m.path / ".kmsfs" / "decrypt", {"CiphertextBlob": blob}) == errno.EIO
    assert errno_of(transact, kpath(m, "proj", "generate-data-key"), {"KeySpec": "AES_256"}) == errno.EIO
    assert errno_of(write_ctl, kpath(m, "proj", "rotate"), "now") == errno.EIO
    assert errno_of(write_ctl, kpath(m, "proj", "state"), "Disabled") == errno.EIO
    assert errno_of(os.mkdir, kpath(m, "newkey")) == errno.EIO
    assert not kpath(m, "newkey").exists()
    assert info(m, "proj") == before_proj
    for rel, header in headers.items():
        assert os.getxattr(store.backing / rel, HEADER_XATTR) == header, rel
    assert_alive(m)


def _after_checks(store: Store, m: Mount, held: int, held_data: bytearray, contents: dict[str, bytes],
                  blob: str, cycle: int) -> None:
    """The token is back: the same mount serves everything again."""
    for rel, data in contents.items():
        assert (m.path / rel).read_bytes() == data, rel
    assert direct_read(held, len(held_data) + B) == bytes(held_data)
    (m.path / "new").write_bytes(b"after" * 999)
    assert (m.path / "new").read_bytes() == b"after" * 999
    os.unlink(m.path / "new")
    with open(m.path / "headerless", "r+b") as fh:  # gets its header now
        fh.write(b"now with a header")
    assert (m.path / "headerless").read_bytes() == b"now with a header"
    os.unlink(m.path / "headerless")
    (store.backing / "headerless").touch()  # headerless again, for the next outage
    answer = transact(kpath(m, "kmsfs-default", "encrypt"), {"Plaintext": b64(b"after")})
    assert unb64(transact(m.path / ".kmsfs" / "decrypt", answer)["Plaintext"]) == b"after"
    assert unb64(transact(m.path / ".kmsfs" / "decrypt", {"CiphertextBlob": blob})["Plaintext"]) == b"secret"
    version = info(m, "proj")["CurrentVersion"]
    write_ctl(kpath(m, "proj", "rotate"), "now")
    assert info(m, "proj")["CurrentVersion"] == version + 1
    write_ctl(kpath(m, "proj", "state"), "Disabled")
    assert errno_of((m.path / "d" / "p").read_bytes) == errno.EACCES
    write_ctl(kpath(m, "proj", "state"), "Enabled")
    assert (m.path / "d" / "p").read_bytes() == contents["d/p"]
    os.mkdir(kpath(m, f"newkey{cycle}"))
    assert info(m, f"newkey{cycle}")["KeyState"] == "Enabled"


def test_hsm_outage_while_mounted_fails_only_what_needs_the_hsm_and_recovers(store):
    # Without the DEK cache, so that every first open needs the HSM (the next
    # test shows what the cache keeps working).
    m = store.mount(None, "dek_cache=0")
    create_key(m, "proj")
    (m.path / "d").mkdir()
    os.setxattr(m.path / "d", "user.kmsfs.key", b"proj")
    contents = {"closed": os.urandom(20_000), "d/b": os.urandom(5000), "d/p": b"under proj" * 100, "empty": b""}
    for rel, data in contents.items():
        (m.path / rel).write_bytes(data)
    (store.backing / "headerless").touch()  # empty, no header: as if created behind kmsfs's back
    held_data = bytearray(os.urandom(4 * B))
    (m.path / "held").write_bytes(held_data)
    blob = transact(kpath(m, "kmsfs-default", "encrypt"), {"Plaintext": b64(b"secret")})["CiphertextBlob"]
    held = direct_fd(m.path / "held")
    try:
        for cycle in range(max(2, int(2 * SCALE))):  # more outages after the first recovery
            with token_gone(store):
                _outage_checks(store, m, held, held_data, contents, blob)
            _after_checks(store, m, held, held_data, contents, blob, cycle)
            assert_alive(m)
    finally:
        os.close(held)
    assert log_lines(m, "stopped answering"), "the outage was never noticed"
    assert len(log_lines(m, "reconnected to PKCS#11 token")) >= 2
    assert not log_lines(m, "unexpected error", "main loop failed"), m.log()[-4000:]
    m.unmount()
    assert (store.backing / "held").stat().st_size > 0
    code, report = fsck(store)
    assert code == 0, report
    # fsck itself cannot check without the HSM, and says so.
    with token_gone(store):
        code, report = fsck(store)
        assert code == 8, report
        assert "cannot check" in report["stderr"] and "token directory" in report["stderr"], report["stderr"]
    assert fsck(store)[0] == 0


def test_files_in_the_dek_cache_open_during_an_hsm_outage_until_their_entry_expires(store):
    m = store.mount(None, "dek_cache_seconds=3")
    data = os.urandom(10_000)
    (m.path / "recent").write_bytes(data)
    created = time.monotonic()
    with token_gone(store):
        assert (m.path / "recent").read_bytes() == data  # its DEK is cached since the create
        assert errno_of((m.path / "new").write_bytes, b"x") == errno.EIO  # a create still needs the HSM
        time.sleep(max(0.0, created + 3.2 - time.monotonic()))
        assert errno_of((m.path / "recent").read_bytes) == errno.EIO  # expired: the HSM is needed again
    assert (m.path / "recent").read_bytes() == data
    assert not log_lines(m, "unexpected error", "main loop failed"), m.log()[-4000:]


WRITER = textwrap.dedent("""
    import hashlib, json, os, random, sys, time
    directory, seconds = sys.argv[1], float(sys.argv[2])
    rng = random.Random(7)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        name = f"f{i:05d}"
        path = os.path.join(directory, name)
        data = rng.randbytes(rng.choice([0, 1, 4095, 4096, 4097, 20_000, 70_000]))
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            print(json.dumps({"name": name, "create": exc.errno}), flush=True)
            i += 1
            continue
        try:
            # The DEK of a file just created is in memory: writing needs no HSM.
            pos = 0
            while pos < len(data):
                pos += os.write(fd, data[pos:pos + rng.choice([1000, 4096, 65536])])
            if i % 3 == 0:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with open(path, "rb") as fh:  # a fresh open needs the HSM
                ok = fh.read() == data
            reopen = 0
        except OSError as exc:
            ok, reopen = None, exc.errno
        print(json.dumps({"name": name, "create": 0, "sha": hashlib.sha256(data).hexdigest(),
                          "size": len(data), "verified": ok, "reopen": reopen}), flush=True)
        i += 1
""")


def test_hsm_outages_under_load_never_write_data_without_a_wrapped_key(store):
    """A writer creates, writes and re-reads files while the token keeps vanishing."""
    m = store.mount()
    directory = m.path / "load"
    directory.mkdir()
    seconds = 3.0 * SCALE
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    outages = 0
    try:
        time.sleep(0.3)
        deadline = time.monotonic() + seconds - 0.6
        while time.monotonic() < deadline:
            with token_gone(store):
                time.sleep(0.15)
            outages += 1
            time.sleep(0.15)
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err.decode()
    records = [json.loads(line) for line in out.decode().splitlines()]
    created = [r for r in records if r["create"] == 0]
    refused = [r for r in records if r["create"] != 0]
    assert created and refused, f"the outages hit no create ({len(created)} created, {len(refused)} refused)"
    assert {r["create"] for r in refused} == {errno.EIO}
    assert all(r["verified"] in (True, None) for r in created)
    assert {r["reopen"] for r in created} <= {0, errno.EIO}
    assert_alive(m)
    # Every file that was created holds exactly what was written; refused creates left nothing.
    assert sorted(os.listdir(directory)) == sorted(r["name"] for r in created)
    for r in created:
        data = (directory / r["name"]).read_bytes()
        assert len(data) == r["size"] and hashlib.sha256(data).hexdigest() == r["sha"], r["name"]
    for r in created:
        if r["size"]:
            # Non-empty files all carry a header: nothing was written without a wrapped key.
            os.getxattr(store.backing / "load" / r["name"], HEADER_XATTR)
    assert not log_lines(m, "unexpected error", "main loop failed"), m.log()[-4000:]
    m.unmount()
    code, report = fsck(store)
    assert code == 0, report
    assert report["files_checked"] == len(created)
