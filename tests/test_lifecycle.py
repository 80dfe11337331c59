"""Key lifecycle through real mounts: the ``.kmsfs/`` control directory and ``kmsfs key``.

Happy paths for every control file, for the lifecycle semantics (disable,
rotate, rewrap, scheduled deletion, automatic rotation, grants, per-file key
choice, import of external key material) and for the CLI in both its modes
(``--mount`` through a mount, ``--store`` on an unmounted store).  Refusals
and races are in test_lifecycle_errors.py, which reuses the helpers here.

Whether the HSM itself refuses a disabled key is checked with python-pkcs11
in a subprocess: python-pkcs11 loads SoftHSM2 once per process, and SoftHSM2
reads SOFTHSM2_CONF when it is loaded.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Mount, Store
from kmsfs.format import parse_header

pytestmark = pytest.mark.mount

KEY_XATTR = "user.kmsfs.key"
HEADER_XATTR = "user.kmsfs"
DAY = 86400
METADATA_FIELDS = (
    "KeyId", "Alias", "Description", "KeyState", "Origin", "Owner", "CreateTime", "KeyRotationEnabled",
    "RotateDays", "LastRotateTime", "NextRotateTime", "DeletionDate", "CurrentVersion",
)
TOP_FILES = ("README", "status", "audit.log", "default-key", "create-key", "decrypt", "reencrypt")
KEY_FILES = ("info", "state", "description", "rotate", "rotation", "deletion", "rewrap", "grants",
             "encrypt", "generate-data-key")
OTHER_UID = 1234
#: Commands run as another uid need an interpreter that uid may execute (the
#: venv's may live under /root); they only use the standard library.
USER_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")


# ====================================================================== helpers


def ctl(m: Mount) -> Path:
    return m.path / ".kmsfs"


def kpath(m: Mount, alias: str, leaf: str = "") -> Path:
    path = ctl(m) / "keys" / alias
    return path / leaf if leaf else path


def write_ctl(path: Path, data: bytes | str) -> None:
    """One write(2) to a control file: one command."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.write(fd, raw) == len(raw)
    finally:
        os.close(fd)


def read_ctl(path: Path) -> str:
    return path.read_bytes().decode()


def info(m: Mount, alias: str) -> dict[str, Any]:
    return json.loads(kpath(m, alias, "info").read_bytes())


def transact(path: Path, request: dict[str, Any] | bytes) -> dict[str, Any]:
    """Write a request and read its answer on the same open file."""
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, raw)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks))


def audit(m: Mount) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ctl(m) / "audit.log").read_bytes().splitlines()]


def audit_since(m: Mount, count: int) -> list[dict[str, Any]]:
    return audit(m)[count:]


def errno_of(fn: Callable[..., Any], *args: Any) -> int | None:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return None


def key_of(path: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(path, KEY_XATTR))


def backing_header(store: Store, rel: str):  # -> kmsfs.format.Header
    return parse_header(os.getxattr(store.backing / rel, HEADER_XATTR))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def create_key(m: Mount, alias: str) -> dict[str, Any]:
    os.mkdir(kpath(m, alias))
    return info(m, alias)


def key_dir(m: Mount, name: str, alias: str, mode: int = 0o755) -> Path:
    """A directory whose new files go under ``alias``."""
    d = m.path / name
    d.mkdir()
    os.chmod(d, mode)
    os.setxattr(d, KEY_XATTR, alias.encode())
    return d


def wait_for(predicate: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_rewrap(m: Mount, alias: str, timeout: float = 60) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        progress = json.loads(kpath(m, alias, "rewrap").read_bytes())
        return progress if progress["state"] not in ("running",) else None

    return wait_for(finished, timeout, f"rewrap of {alias}")


def edit_keys(store: Store, alias: str, **changes: Any) -> None:
    """Edit one key's record in keys.json behind kmsfs's back (under its lock)."""
    sdir = store.backing / ".kmsfs.d"
    fd = os.open(sdir / "keys.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = json.loads((sdir / "keys.json").read_bytes())
        [record] = [k for k in data["keys"] if k["Alias"] == alias]
        record.update(changes)
        tmp = sdir / ".keys.json.test-edit"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, sdir / "keys.json")
    finally:
        os.close(fd)


def store_config(store: Store) -> dict[str, Any]:
    return json.loads((store.backing / ".kmsfs.d" / "config.json").read_bytes())


def store_pin(store: Store) -> str:
    from kmsfs.pkcs11uri import Pkcs11Uri

    pin = Pkcs11Uri.parse(store_config(store)["hsm"]["uri"]).read_pin()
    assert len(pin) >= 16
    return pin


HSM_PROBE = r"""
import json, sys, uuid
from pathlib import Path
import pkcs11
from pkcs11 import Attribute, ObjectClass
from kmsfs.store import load_config

uri = load_config(Path(sys.argv[1])).uri()
prefix = uuid.UUID(sys.argv[2]).bytes
token = pkcs11.lib(uri.module_path).get_token(token_label=uri.token)
found = {}
with token.open(user_pin=uri.read_pin()) as session:
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        oid = bytes(obj[Attribute.ID])
        if len(oid) == 20 and oid[:16] == prefix:
            found[int.from_bytes(oid[16:], "big")] = {
                name: bool(obj[getattr(Attribute, name.upper())])
                for name in ("encrypt", "decrypt", "extractable", "sensitive")
            }
print(json.dumps(found))
"""


def hsm_versions(store: Store, key_id: str) -> dict[int, dict[str, bool]]:
    """The HSM's own view of a CMK's versions, from a fresh process."""
    env = {**store.env, **store_config(store)["hsm"]["env"]}
    result = subprocess.run([sys.executable, "-c", HSM_PROBE, str(store.backing), key_id],
                            capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return {int(k): v for k, v in json.loads(result.stdout).items()}


def cli(store: Store, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run([sys.executable, "-m", "kmsfs", *args], capture_output=True, env=store.env,
                            input=input if input is not None else b"", timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"kmsfs {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout.decode()}\n{result.stderr.decode()}")
    return result


# ---------------------------------------------------------------------- another uid

USER_SCRIPT = r"""
import base64, json, os, sys

def write(path, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)

def read(path):
    with open(path, "rb") as fh:
        return fh.read()

def create(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return b""

def transact(path, request):
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, request)
        out = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return out
            out += chunk
    finally:
        os.close(fd)

def mkdir(path):
    os.mkdir(path)

def rename(old, new):
    os.rename(old, new)

def whoami():
    return json.dumps([os.getuid(), os.getgid(), os.getgroups()]).encode()

op = sys.argv[1]
args = [base64.b64decode(a) for a in sys.argv[2:]]
try:
    out = globals()[op](*args) or b""
    print(json.dumps({"errno": 0, "out": base64.b64encode(out).decode()}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno, "out": ""}))
"""


def as_user(op: str, *args: bytes | str | Path, uid: int = OTHER_UID, gid: int = OTHER_UID) -> tuple[int, bytes]:
    """Run one file operation as ``uid``/``gid`` (no supplementary groups): (errno or 0, output)."""
    encoded = [base64.b64encode(a if isinstance(a, bytes) else os.fsencode(str(a))).decode() for a in args]
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", USER_PYTHON, "-c", USER_SCRIPT,
         op, *encoded], capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    return answer["errno"], base64.b64decode(answer["out"])


def require_other_uid() -> None:
    if os.geteuid() != 0 or USER_PYTHON is None or shutil.which("setpriv") is None:
        pytest.skip("needs root, setpriv and a system python3 to act as a second uid")


@contextlib.contextmanager
def open_mountpoint() -> Iterator[Path]:
    """A mountpoint every uid can reach (pytest's tmp dirs are mode 0700)."""
    base = Path(tempfile.mkdtemp(prefix="kmsfs-lifecycle-"))
    os.chmod(base, 0o755)
    try:
        yield base / "mnt"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def shared_mount(store: Store) -> Iterator[Mount]:
    """A mount with allow_other at a mountpoint other uids can reach."""
    require_other_uid()
    with open_mountpoint() as mnt:
        m = store.mount(mnt, "allow_other")
        try:
            yield m
        finally:
            m.cleanup()


# ====================================================================== the control directory


def test_control_directory_lists_its_files_and_readme_names_them(mounted):
    c = ctl(mounted)
    assert sorted(os.listdir(c)) == sorted(("keys",) + TOP_FILES)
    assert os.listdir(c / "keys") == ["kmsfs-default"]
    assert sorted(os.listdir(kpath(mounted, "kmsfs-default"))) == sorted(KEY_FILES + ("import",))
    assert sorted(os.listdir(kpath(mounted, "kmsfs-default", "import"))) == ["material", "wrapping-key.pem"]
    readme = read_ctl(c / "README")
    for name in TOP_FILES + KEY_FILES + ("keys/", "import/", "wrapping-key.pem", "material"):
        assert name in readme, name
    for word in ("Enabled", "Disabled", "PendingDelete", "PendingImport", "7-365", "7-30", "cancel", "1024"):
        assert word in readme, word
    # The status fields it names are the status's own (a new one must be added to both).
    status = json.loads((c / "status").read_bytes())
    for field in ("hsm_calls", "dek_cache", "prefetch", "client_spin", "decrypt_helper", "header_memo"):
        assert field in readme and field in status, field


def test_status_names_store_hsm_and_default_key_but_never_the_pin(mounted):
    store = mounted.store
    status = json.loads((ctl(mounted) / "status").read_bytes())
    config = store_config(store)
    assert status["store_id"] == config["store_id"]
    assert status["format_version"] == 2 and status["block_size"] == 4068
    assert status["hsm"]["module"].endswith("libsofthsm2.so")
    assert status["hsm"]["token"] == "kmsfs-" + config["store_id"][:16]
    assert status["default_key"]["Alias"] == "kmsfs-default"
    assert status["keys"] == 1 and status["key_states"] == {"Enabled": 1}
    pin = store_pin(store)
    for name in ("status", "README", "audit.log"):
        assert pin not in read_ctl(ctl(mounted) / name)
    create_key(mounted, "second")
    write_ctl(kpath(mounted, "second", "state"), "Disabled")
    status = json.loads((ctl(mounted) / "status").read_bytes())
    assert status["keys"] == 2 and status["key_states"] == {"Enabled": 1, "Disabled": 1}
    assert pin not in json.dumps(info(mounted, "second"))


def test_mkdir_creates_a_non_extractable_hsm_key_and_mv_changes_its_alias(mounted):
    before = time.time()
    meta = create_key(mounted, "projects")
    assert set(METADATA_FIELDS) <= set(meta)
    assert meta["Alias"] == "projects" and meta["Description"] == ""
    assert meta["KeyState"] == "Enabled" and meta["Origin"] == "KMSFS"
    assert meta["Owner"] == str(os.getuid())
    assert before - 2 <= meta["CreateTime"] <= time.time() + 2
    assert meta["CurrentVersion"] == 1 and meta["KeyRotationEnabled"] is False
    assert meta["RotateDays"] == meta["LastRotateTime"] == meta["NextRotateTime"] == meta["DeletionDate"] == 0
    uuid.UUID(meta["KeyId"])
    assert hsm_versions(mounted.store, meta["KeyId"]) == {
        1: {"encrypt": True, "decrypt": True, "extractable": False, "sensitive": True}}
    assert read_ctl(kpath(mounted, "projects", "state")) == "Enabled\n"

    os.rename(kpath(mounted, "projects"), kpath(mounted, "team-projects"))
    assert sorted(os.listdir(ctl(mounted) / "keys")) == ["kmsfs-default", "team-projects"]
    renamed = info(mounted, "team-projects")
    assert renamed["KeyId"] == meta["KeyId"] and renamed["Alias"] == "team-projects"
    assert not kpath(mounted, "projects").exists()

    lines = audit(mounted)
    create = [e for e in lines if e["operation"] == "CreateKey" and e["key"] == meta["KeyId"]]
    alias = [e for e in lines if e["operation"] == "UpdateAlias" and e["key"] == meta["KeyId"]]
    assert len(create) == 1 and len(alias) == 1
    for entry in create + alias:
        assert entry["result"] == "ok" and entry["uid"] == os.getuid()
        time.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ")


def test_description_rotation_deletion_grants_and_rewrap_read_back(mounted):
    create_key(mounted, "k")
    assert read_ctl(kpath(mounted, "k", "description")) == ""
    write_ctl(kpath(mounted, "k", "description"), "for project files, Schlüssel ✓\n")
    assert read_ctl(kpath(mounted, "k", "description")) == "for project files, Schlüssel ✓\n"
    assert info(mounted, "k")["Description"] == "for project files, Schlüssel ✓"
    longest = "é" * 512  # 1024 bytes of UTF-8
    write_ctl(kpath(mounted, "k", "description"), longest)
    assert info(mounted, "k")["Description"] == longest
    write_ctl(kpath(mounted, "k", "description"), "\n")
    assert info(mounted, "k")["Description"] == ""

    assert read_ctl(kpath(mounted, "k", "rotation")) == "off\n"
    for days in (7, 30, 365):
        write_ctl(kpath(mounted, "k", "rotation"), f"{days}\n")
        assert read_ctl(kpath(mounted, "k", "rotation")) == f"{days}\n"
        meta = info(mounted, "k")
        assert meta["KeyRotationEnabled"] is True and meta["RotateDays"] == days
        assert abs(meta["NextRotateTime"] - (time.time() + days * DAY)) < 60
    write_ctl(kpath(mounted, "k", "rotation"), "off")
    meta = info(mounted, "k")
    assert read_ctl(kpath(mounted, "k", "rotation")) == "off\n"
    assert meta["KeyRotationEnabled"] is False and meta["NextRotateTime"] == 0

    assert read_ctl(kpath(mounted, "k", "deletion")) == "none\n"

    assert read_ctl(kpath(mounted, "k", "grants")) == ""
    write_ctl(kpath(mounted, "k", "grants"), "# who may use this key\nuid:1234 use\n\n  gid:2000   admin  \n")
    assert read_ctl(kpath(mounted, "k", "grants")) == "gid:2000 admin\nuid:1234 use\n"
    write_ctl(kpath(mounted, "k", "grants"), "uid:1234 admin\n")
    assert read_ctl(kpath(mounted, "k", "grants")) == "uid:1234 admin\n"
    write_ctl(kpath(mounted, "k", "grants"), "\n")
    assert read_ctl(kpath(mounted, "k", "grants")) == ""

    progress = json.loads(kpath(mounted, "k", "rewrap").read_bytes())
    assert progress["state"] == "idle" and progress["total"] == 0

    operations = [e["operation"] for e in audit(mounted) if e["key"] == info(mounted, "k")["KeyId"]]
    for op in ("UpdateKeyDescription", "EnableKeyRotation", "DisableKeyRotation", "UpdateGrants"):
        assert op in operations


def test_default_key_and_directory_key_choose_the_key_of_new_files(mounted):
    a = create_key(mounted, "alpha")
    b = create_key(mounted, "beta")
    default = info(mounted, "kmsfs-default")
    assert read_ctl(ctl(mounted) / "default-key") == "kmsfs-default\n"
    (mounted.path / "before").write_bytes(b"1")
    assert key_of(mounted.path / "before")["KeyId"] == default["KeyId"]

    write_ctl(ctl(mounted) / "default-key", "alpha\n")
    assert read_ctl(ctl(mounted) / "default-key") == "alpha\n"
    assert json.loads((ctl(mounted) / "status").read_bytes())["default_key"]["KeyId"] == a["KeyId"]
    (mounted.path / "after").write_bytes(b"2")
    assert key_of(mounted.path / "after") == {"KeyId": a["KeyId"], "Alias": "alpha", "KeyVersion": 1}

    # A directory naming a key overrides the default for everything below it.
    d = key_dir(mounted, "d", "beta")
    (d / "sub").mkdir()
    (d / "sub" / "f").write_bytes(b"3")
    assert key_of(d / "sub" / "f")["KeyId"] == b["KeyId"]
    # Directories store the KeyId: renaming the alias keeps the choice.
    os.rename(kpath(mounted, "beta"), kpath(mounted, "gamma"))
    (d / "g").write_bytes(b"4")
    assert key_of(d / "g") == {"KeyId": b["KeyId"], "Alias": "gamma", "KeyVersion": 1}

    # By KeyId too.
    write_ctl(ctl(mounted) / "default-key", default["KeyId"])
    assert read_ctl(ctl(mounted) / "default-key") == "kmsfs-default\n"
    for name, data in (("before", b"1"), ("after", b"2")):
        assert (mounted.path / name).read_bytes() == data
    assert [e for e in audit(mounted) if e["operation"] == "SetDefaultKey" and e["result"] == "ok"]


# ====================================================================== disable and enable


def test_disable_cuts_off_open_files_the_page_cache_the_hsm_and_small_data_crypto(mounted):
    store = mounted.store
    meta = create_key(mounted, "proj")
    d = key_dir(mounted, "d", "proj")
    data = os.urandom(3 * 4096 + 123)
    f = d / "f"
    f.write_bytes(data)
    blob = transact(kpath(mounted, "proj", "encrypt"), {"Plaintext": b64(b"small secret")})["CiphertextBlob"]
    other = mounted.path / "other"
    other.write_bytes(b"under the default key")

    fd = os.open(f, os.O_RDWR)
    reader = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, len(data), 0) == data  # warms the page cache
        assert os.pread(reader, 100, 0) == data[:100]
        count = len(audit(mounted))

        write_ctl(kpath(mounted, "proj", "state"), "Disabled\n")
        assert read_ctl(kpath(mounted, "proj", "state")) == "Disabled\n"
        assert info(mounted, "proj")["KeyState"] == "Disabled"

        assert errno_of(os.pread, fd, len(data), 0) == errno.EACCES
        assert errno_of(os.pread, reader, 100, 0) == errno.EACCES
        assert errno_of(os.pwrite, fd, b"x", 0) == errno.EACCES
        assert errno_of(f.read_bytes) == errno.EACCES
        assert errno_of((d / "new").write_bytes, b"x") == errno.EACCES
        assert errno_of(transact, kpath(mounted, "proj", "encrypt"), {"Plaintext": b64(b"x")}) == errno.EACCES
        assert errno_of(transact, ctl(mounted) / "decrypt", {"CiphertextBlob": blob}) == errno.EACCES
        assert errno_of(transact, kpath(mounted, "proj", "generate-data-key"), {}) == errno.EACCES
        # Other keys are not affected, and metadata stays visible.
        assert other.read_bytes() == b"under the default key"
        assert key_of(f)["KeyId"] == meta["KeyId"]

        versions = hsm_versions(store, meta["KeyId"])
        assert versions[1]["encrypt"] is False and versions[1]["decrypt"] is False

        lines = audit_since(mounted, count)
        assert {"operation": "DisableKey", "key": meta["KeyId"], "result": "ok"}.items() <= lines[0].items()
        denied = [e for e in lines if e["result"] == "denied"]
        assert {e["operation"] for e in denied} >= {"OpenFile", "Encrypt", "Decrypt", "GenerateDataKey"}
        assert all(e["reason"] and e["key"] in (meta["KeyId"], "") for e in denied)

        write_ctl(kpath(mounted, "proj", "state"), "Enabled")
        assert info(mounted, "proj")["KeyState"] == "Enabled"
        assert os.pread(fd, len(data), 0) == data
        assert os.pread(reader, 100, 0) == data[:100]
        os.pwrite(fd, b"Z", 5)
    finally:
        os.close(fd)
        os.close(reader)
    assert f.read_bytes() == data[:5] + b"Z" + data[6:]
    assert transact(ctl(mounted) / "decrypt", {"CiphertextBlob": blob})["Plaintext"] == b64(b"small secret")
    versions = hsm_versions(store, meta["KeyId"])
    assert versions[1]["encrypt"] is True and versions[1]["decrypt"] is True
    assert [e["operation"] for e in audit(mounted)].count("EnableKey") == 1


def test_editing_keys_json_cannot_re_enable_a_disabled_key(store):
    m = store.mount()
    meta = create_key(m, "proj")
    write_ctl(kpath(m, "proj", "rotate"), "1")  # two versions, both must stay refused
    d = key_dir(m, "d", "proj")
    (d / "f").write_bytes(b"secret data")
    blob = transact(kpath(m, "proj", "encrypt"), {"Plaintext": b64(b"x")})["CiphertextBlob"]
    write_ctl(kpath(m, "proj", "state"), "Disabled")
    m.unmount()

    edit_keys(store, "proj", KeyState="Enabled")
    m = store.mount()
    assert info(m, "proj")["KeyState"] == "Enabled"  # the metadata was forged ...
    assert errno_of((m.path / "d" / "f").read_bytes) in (errno.EACCES, errno.EIO)  # ... the HSM was not
    assert errno_of(transact, ctl(m) / "decrypt", {"CiphertextBlob": blob}) in (errno.EACCES, errno.EIO)
    assert errno_of(transact, kpath(m, "proj", "encrypt"), {"Plaintext": b64(b"x")}) in (errno.EACCES, errno.EIO)
    assert errno_of((m.path / "d" / "new").write_bytes, b"x") in (errno.EACCES, errno.EIO)
    for flags in hsm_versions(store, meta["KeyId"]).values():
        assert flags["encrypt"] is False and flags["decrypt"] is False


# ====================================================================== rotation and rewrap


def test_rotate_adds_a_version_new_files_use_it_and_rewrap_moves_old_files(mounted):
    store = mounted.store
    meta = create_key(mounted, "proj")
    d = key_dir(mounted, "d", "proj")
    (d / "sub").mkdir()
    old = {"d/a": os.urandom(10000), "d/sub/c": os.urandom(5), "d/empty": b""}
    for rel, data in old.items():
        (mounted.path / rel).write_bytes(data)
    unrelated = mounted.path / "unrelated"
    unrelated.write_bytes(b"default key")
    content_before = {rel: (store.backing / rel).read_bytes() for rel in old}
    headers_before = {rel: backing_header(store, rel) for rel in old}
    unrelated_header = os.getxattr(store.backing / "unrelated", HEADER_XATTR)

    write_ctl(kpath(mounted, "proj", "rotate"), "now")
    rotated = info(mounted, "proj")
    assert rotated["CurrentVersion"] == 2 and rotated["Versions"] == [1, 2]
    assert abs(rotated["LastRotateTime"] - time.time()) < 60
    assert sorted(hsm_versions(store, meta["KeyId"])) == [1, 2]

    (d / "b").write_bytes(b"new file")
    assert key_of(d / "b") == {"KeyId": meta["KeyId"], "Alias": "proj", "KeyVersion": 2}
    for rel, data in old.items():
        assert key_of(mounted.path / rel)["KeyVersion"] == 1
        assert (mounted.path / rel).read_bytes() == data

    write_ctl(kpath(mounted, "proj", "rewrap"), "start\n")
    progress = wait_rewrap(mounted, "proj")
    assert progress["state"] == "done", progress
    assert (progress["total"], progress["done"], progress["skipped"], progress["failed"]) == (4, 3, 1, 0)
    for rel, data in old.items():
        assert key_of(mounted.path / rel)["KeyVersion"] == 2
        assert (store.backing / rel).read_bytes() == content_before[rel]  # content untouched
        new = backing_header(store, rel)
        assert new.key_version == 2 and new.file_id == headers_before[rel].file_id
        assert new.wrapped_dek != headers_before[rel].wrapped_dek
        assert (mounted.path / rel).read_bytes() == data
    assert os.getxattr(store.backing / "unrelated", HEADER_XATTR) == unrelated_header
    assert [e for e in audit(mounted) if e["operation"] == "RotateKey" and e["result"] == "ok"]
    assert [e for e in audit(mounted) if e["operation"] == "Rewrap" and e["key"] == meta["KeyId"]]

    # A second rewrap finds nothing to do; everything survives a remount.
    write_ctl(kpath(mounted, "proj", "rewrap"), "start")
    assert wait_rewrap(mounted, "proj")["skipped"] == 4
    mounted.unmount()
    m2 = store.mount()
    for rel, data in old.items():
        assert (m2.path / rel).read_bytes() == data
    assert (m2.path / "d" / "b").read_bytes() == b"new file"


def test_rewrap_survives_kill9_and_finishes_when_started_again(store):
    m = store.mount()
    create_key(m, "bulk")
    d = key_dir(m, "d", "bulk")
    names = [f"f{i:04d}" for i in range(600)]
    for name in names:
        (d / name).write_bytes(name.encode() * 3)
    # A rewrap of a few hundred files takes milliseconds, so the kill may come
    # too late; rotate and try again until it lands in the middle.
    for _attempt in range(8):
        write_ctl(kpath(m, "bulk", "rotate"), "1")
        newest = json.loads(kpath(m, "bulk", "info").read_bytes())["CurrentVersion"]
        write_ctl(kpath(m, "bulk", "rewrap"), "start")
        mount = m
        wait_for(lambda: json.loads(kpath(mount, "bulk", "rewrap").read_bytes())["done"] >= 1,
                 30, "the rewrap to start")
        m.kill9()
        versions = [backing_header(store, f"d/{n}").key_version for n in names]
        moved = versions.count(newest)
        if 1 <= moved < len(names):
            break
        m = store.mount()
    else:
        pytest.fail("the daemon was never killed in the middle of the rewrap in 8 tries")

    m = store.mount()
    for name in names:
        assert (m.path / "d" / name).read_bytes() == name.encode() * 3
    write_ctl(kpath(m, "bulk", "rewrap"), "start")
    progress = wait_rewrap(m, "bulk")
    assert progress["state"] == "done" and progress["failed"] == 0
    assert progress["skipped"] == moved and progress["done"] == len(names) - moved
    assert all(backing_header(store, f"d/{n}").key_version == newest for n in names)
    for name in names[::37]:
        assert (m.path / "d" / name).read_bytes() == name.encode() * 3


def test_automatic_rotation_runs_at_mount_and_periodically(store):
    m = store.mount()
    meta = create_key(m, "auto")
    write_ctl(kpath(m, "auto", "rotation"), "7")
    create_key(m, "manual")  # rotation off: never rotated automatically
    m.unmount()

    edit_keys(store, "auto", NextRotateTime=int(time.time()) - 10)
    edit_keys(store, "manual", NextRotateTime=int(time.time()) - 10)
    m = store.mount()  # the default schedule interval is 60 s: this is the check at mount
    rotated = info(m, "auto")
    assert rotated["CurrentVersion"] == 2 and rotated["Versions"] == [1, 2]
    assert abs(rotated["NextRotateTime"] - (time.time() + 7 * DAY)) < 60
    assert info(m, "manual")["CurrentVersion"] == 1
    auto_lines = [e for e in audit(m) if e["operation"] == "AutoRotateKey"]
    assert len(auto_lines) == 1 and auto_lines[0]["key"] == meta["KeyId"] and auto_lines[0]["result"] == "ok"
    m.unmount()

    store.env["KMSFS_SCHEDULE_INTERVAL"] = "0.5"
    m = store.mount()
    assert info(m, "auto")["CurrentVersion"] == 2
    edit_keys(store, "auto", NextRotateTime=int(time.time()) - 10)
    wait_for(lambda: info(m, "auto")["CurrentVersion"] == 3, 15, "a periodic automatic rotation")
    (m.path / "x").write_bytes(b"")
    assert sorted(hsm_versions(store, meta["KeyId"])) == [1, 2, 3]
    time.sleep(1.2)  # not due again: no further version
    assert info(m, "auto")["CurrentVersion"] == 3
    assert info(m, "manual")["CurrentVersion"] == 1


# ====================================================================== scheduled deletion


def test_scheduled_deletion_blocks_use_and_cancel_returns_the_key_disabled(mounted):
    meta = create_key(mounted, "old")
    d = key_dir(mounted, "d", "old")
    (d / "f").write_bytes(b"data")
    write_ctl(kpath(mounted, "old", "deletion"), "7\n")
    now = time.time()
    pending = info(mounted, "old")
    assert pending["KeyState"] == "PendingDelete"
    assert abs(pending["DeletionDate"] - (now + 7 * DAY)) < 60
    shown = read_ctl(kpath(mounted, "old", "deletion")).strip()
    assert shown == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pending["DeletionDate"]))
    assert read_ctl(kpath(mounted, "old", "state")) == "PendingDelete\n"
    assert errno_of((d / "f").read_bytes) == errno.EACCES
    assert errno_of(transact, kpath(mounted, "old", "encrypt"), {"Plaintext": b64(b"x")}) == errno.EACCES
    assert all(not v["decrypt"] for v in hsm_versions(mounted.store, meta["KeyId"]).values())

    write_ctl(kpath(mounted, "old", "deletion"), "cancel")
    cancelled = info(mounted, "old")
    assert cancelled["KeyState"] == "Disabled" and cancelled["DeletionDate"] == 0
    assert read_ctl(kpath(mounted, "old", "deletion")) == "none\n"
    assert errno_of((d / "f").read_bytes) == errno.EACCES
    write_ctl(kpath(mounted, "old", "state"), "Enabled")
    assert (d / "f").read_bytes() == b"data"

    write_ctl(kpath(mounted, "old", "deletion"), "30")
    assert abs(info(mounted, "old")["DeletionDate"] - (time.time() + 30 * DAY)) < 60
    write_ctl(kpath(mounted, "old", "deletion"), "cancel")
    ops = [e["operation"] for e in audit(mounted) if e["key"] == meta["KeyId"] and e["result"] == "ok"]
    assert ops.count("ScheduleKeyDeletion") == 2 and ops.count("CancelKeyDeletion") == 2


def _doomed_key(m: Mount) -> tuple[dict[str, Any], str]:
    meta = create_key(m, "doomed")
    write_ctl(kpath(m, "doomed", "rotate"), "1")
    d = key_dir(m, "d", "doomed")
    (d / "f").write_bytes(b"soon unrecoverable")
    (m.path / "keep").write_bytes(b"default key")
    blob = transact(kpath(m, "doomed", "encrypt"), {"Plaintext": b64(b"x")})["CiphertextBlob"]
    write_ctl(kpath(m, "doomed", "deletion"), "7")
    return meta, blob


def _assert_destroyed(m: Mount, meta: dict[str, Any], blob: str) -> None:
    assert "doomed" not in os.listdir(ctl(m) / "keys")
    assert not kpath(m, "doomed").exists()
    status = json.loads((ctl(m) / "status").read_bytes())
    assert status["destroyed_keys"] == 1 and status["keys"] == 1
    assert errno_of((m.path / "d" / "f").read_bytes) in (errno.EIO, errno.EACCES)
    assert errno_of(transact, ctl(m) / "decrypt", {"CiphertextBlob": blob}) is not None
    assert (m.path / "keep").read_bytes() == b"default key"
    assert hsm_versions(m.store, meta["KeyId"]) == {}
    deleted = [e for e in audit(m) if e["operation"] == "DeleteKey"]
    assert len(deleted) == 1 and deleted[0]["key"] == meta["KeyId"] and deleted[0]["result"] == "ok"
    assert deleted[0]["reason"]


def test_expired_deletion_window_destroys_the_key_at_mount(store):
    m = store.mount()
    meta, blob = _doomed_key(m)
    m.unmount()
    edit_keys(store, "doomed", DeletionDate=int(time.time()) - 5)
    m = store.mount()
    _assert_destroyed(m, meta, blob)
    m.unmount()
    m = store.mount()  # and it stays destroyed
    assert "doomed" not in os.listdir(ctl(m) / "keys")
    assert errno_of((m.path / "d" / "f").read_bytes) in (errno.EIO, errno.EACCES)


def test_expired_deletion_window_destroys_the_key_while_mounted(store):
    store.env["KMSFS_SCHEDULE_INTERVAL"] = "0.5"
    m = store.mount()
    meta, blob = _doomed_key(m)
    time.sleep(1.2)  # the schedule runs, but the window has not passed
    assert info(m, "doomed")["KeyState"] == "PendingDelete"
    edit_keys(store, "doomed", DeletionDate=int(time.time()) - 5)
    wait_for(lambda: "doomed" not in os.listdir(ctl(m) / "keys"), 15, "the key to be destroyed")
    _assert_destroyed(m, meta, blob)


# ====================================================================== the filesystem's own key


def test_filesystem_managed_default_key_is_viewable_and_rotatable_but_not_disabled_or_deleted(mounted):
    meta = info(mounted, "kmsfs-default")
    assert meta["Owner"] == "kmsfs" and meta["Origin"] == "KMSFS" and meta["KeyState"] == "Enabled"
    (mounted.path / "a").write_bytes(b"a")
    write_ctl(kpath(mounted, "kmsfs-default", "rotate"), "1")
    assert info(mounted, "kmsfs-default")["CurrentVersion"] == 2
    (mounted.path / "b").write_bytes(b"b")
    assert key_of(mounted.path / "b")["KeyVersion"] == 2
    write_ctl(kpath(mounted, "kmsfs-default", "rotation"), "90")
    write_ctl(kpath(mounted, "kmsfs-default", "description"), "ours")
    before = info(mounted, "kmsfs-default")
    count = len(audit(mounted))
    assert errno_of(write_ctl, kpath(mounted, "kmsfs-default", "state"), "Disabled") == errno.EPERM
    assert errno_of(write_ctl, kpath(mounted, "kmsfs-default", "deletion"), "7") == errno.EPERM
    assert info(mounted, "kmsfs-default") == before
    refused = audit_since(mounted, count)
    assert len(refused) == 2 and all(e["result"] == "refused" and "filesystem-managed" in e["reason"]
                                     for e in refused)
    assert (mounted.path / "a").read_bytes() == b"a"


# ====================================================================== grants and a second uid


def test_grants_let_another_uid_use_and_administer_a_key(store):
    with shared_mount(store) as m:
        meta = create_key(m, "team")
        shared = key_dir(m, "shared", "team", mode=0o777)
        f = shared / "f"
        f.write_bytes(b"team data")
        os.chmod(f, 0o666)
        mine = m.path / "mine"
        mine.write_bytes(b"default key")
        os.chmod(mine, 0o666)
        assert as_user("whoami")[1] == json.dumps([OTHER_UID, OTHER_UID, []]).encode()

        # No grant: no use of the key (and no admin).
        count = len(audit(m))
        assert as_user("read", f)[0] == errno.EACCES
        assert as_user("create", shared / "g", b"x")[0] == errno.EACCES
        assert as_user("transact", kpath(m, "team", "encrypt"), b'{"Plaintext": "aGk="}')[0] == errno.EACCES
        denied = [e for e in audit_since(m, count) if e["uid"] == OTHER_UID]
        assert len(denied) == 3 and all(e["result"] == "denied" and e["key"] == meta["KeyId"] for e in denied)

        # use: files and small-data crypto, but no lifecycle changes.
        write_ctl(kpath(m, "team", "grants"), f"uid:{OTHER_UID} use\n")
        assert as_user("read", f) == (0, b"team data")
        assert as_user("create", shared / "g", b"written by 1234") == (0, b"")
        assert (shared / "g").read_bytes() == b"written by 1234"
        assert (shared / "g").stat().st_uid == OTHER_UID
        assert as_user("read", shared / "g") == (0, b"written by 1234")
        code, out = as_user("transact", kpath(m, "team", "encrypt"), json.dumps({"Plaintext": b64(b"hi")}))
        assert code == 0
        blob = json.loads(out)["CiphertextBlob"]
        code, out = as_user("transact", ctl(m) / "decrypt", json.dumps({"CiphertextBlob": blob}))
        assert code == 0 and json.loads(out)["Plaintext"] == b64(b"hi")
        assert as_user("write", kpath(m, "team", "state"), b"Disabled")[0] == errno.EACCES
        assert info(m, "team")["KeyState"] == "Enabled"

        # admin through a group grant.
        write_ctl(kpath(m, "team", "grants"), f"gid:{OTHER_UID} admin\n")
        assert as_user("write", kpath(m, "team", "description"), b"set by 1234")[0] == 0
        assert info(m, "team")["Description"] == "set by 1234"
        assert as_user("write", kpath(m, "team", "state"), b"Disabled")[0] == 0
        assert as_user("read", f)[0] == errno.EACCES
        assert as_user("write", kpath(m, "team", "state"), b"Enabled")[0] == 0
        assert as_user("write", kpath(m, "team", "rotate"), b"1")[0] == 0
        assert info(m, "team")["CurrentVersion"] == 2
        assert as_user("read", f) == (0, b"team data")
        # Creating keys and choosing the default stay with the mounting user and root.
        assert as_user("mkdir", kpath(m, "by-1234"))[0] == errno.EACCES
        assert as_user("write", ctl(m) / "default-key", b"team")[0] == errno.EACCES
        ok = [e for e in audit(m) if e["uid"] == OTHER_UID and e["result"] == "ok"]
        assert {"Encrypt", "Decrypt", "UpdateKeyDescription", "DisableKey", "EnableKey", "RotateKey"} <= {
            e["operation"] for e in ok}

        # Root is admin of every key whatever the grants say.
        write_ctl(kpath(m, "team", "grants"), "\n")
        write_ctl(kpath(m, "team", "description"), "root again")
        assert f.read_bytes() == b"team data"
        assert as_user("read", f)[0] == errno.EACCES
        # Files under keys without grants are not affected by this key's grants.
        assert as_user("read", mine)[0] == errno.EACCES  # kmsfs-default has no grant either
        write_ctl(kpath(m, "kmsfs-default", "grants"), f"uid:{OTHER_UID} use")
        assert as_user("read", mine) == (0, b"default key")


# ====================================================================== per-file key choice


def test_setfattr_moves_a_file_to_another_key_without_rewriting_content(mounted):
    store = mounted.store
    a = create_key(mounted, "a")
    b = create_key(mounted, "b")
    write_ctl(kpath(mounted, "b", "rotate"), "1")
    d = key_dir(mounted, "d", "a")
    data = os.urandom(9000)
    (d / "f").write_bytes(data)
    (d / "stays").write_bytes(b"under a")
    content = (store.backing / "d" / "f").read_bytes()
    before = backing_header(store, "d/f")

    os.setxattr(d / "f", KEY_XATTR, b"b")
    assert key_of(d / "f") == {"KeyId": b["KeyId"], "Alias": "b", "KeyVersion": 2}
    after = backing_header(store, "d/f")
    assert after.key_id == uuid.UUID(b["KeyId"]).bytes and after.file_id == before.file_id
    assert (store.backing / "d" / "f").read_bytes() == content
    assert (d / "f").read_bytes() == data

    # The file no longer depends on key a; by KeyId works as well.
    write_ctl(kpath(mounted, "a", "state"), "Disabled")
    assert (d / "f").read_bytes() == data
    assert errno_of((d / "stays").read_bytes) == errno.EACCES
    write_ctl(kpath(mounted, "a", "state"), "Enabled")
    os.setxattr(d / "f", KEY_XATTR, a["KeyId"].encode())
    assert key_of(d / "f")["Alias"] == "a"
    assert (store.backing / "d" / "f").read_bytes() == content
    mounted.unmount()
    m2 = store.mount()
    assert (m2.path / "d" / "f").read_bytes() == data


def test_rekey_gives_a_file_a_fresh_data_key(mounted):
    store = mounted.store
    create_key(mounted, "k")
    d = key_dir(mounted, "d", "k")
    data = os.urandom(20000)
    f = d / "f"
    f.write_bytes(data)
    os.chmod(f, 0o640)
    os.setxattr(f, "user.note", b"kept")
    before = backing_header(store, "d/f")
    content = (store.backing / "d" / "f").read_bytes()

    result = cli(store, "key", "rekey", str(f))
    assert b"new data key" in result.stdout
    after = backing_header(store, "d/f")
    assert after.file_id != before.file_id and after.key_id == before.key_id
    assert (store.backing / "d" / "f").read_bytes() != content
    assert f.read_bytes() == data
    assert os.getxattr(f, "user.note") == b"kept"
    assert f.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(d)) == ["f"]


def test_rekey_keeps_the_files_key_and_encryption_context(mounted):
    """Not the directory's current ones: a rekey changes the data key and nothing else."""
    store = mounted.store
    create_key(mounted, "k")
    create_key(mounted, "other")
    d = key_dir(mounted, "d", "k")
    os.setxattr(d, "user.kmsfs.context", b'{"dept":"finance"}')
    data = os.urandom(9000)
    (d / "f").write_bytes(data)
    os.setxattr(d, "user.kmsfs.context", b'{}')  # explicitly none
    (d / "plain").write_bytes(b"no context")
    os.setxattr(d, "user.kmsfs.context", b'{"dept":"legal"}')
    os.setxattr(d, "user.kmsfs.key", b"other")
    before = backing_header(store, "d/f")
    for name in ("f", "plain"):
        cli(store, "key", "rekey", str(d / name))
    after = backing_header(store, "d/f")
    assert after.file_id != before.file_id
    assert after.key_id == before.key_id and after.context == b'{"dept":"finance"}'
    assert (d / "f").read_bytes() == data
    assert os.getxattr(d / "f", "user.kmsfs.context") == b'{"dept":"finance"}'
    plain = backing_header(store, "d/plain")
    assert plain.context == b"" and json.loads(os.getxattr(d / "plain", "user.kmsfs.key"))["Alias"] == "k"
    assert (d / "plain").read_bytes() == b"no context"
    assert sorted(os.listdir(d)) == ["f", "plain"]


# ====================================================================== persistence and sharing


def _snapshot(m: Mount) -> dict[str, Any]:
    keys = sorted(os.listdir(ctl(m) / "keys"))
    return {
        "keys": {k: (info(m, k), read_ctl(kpath(m, k, "grants")), read_ctl(kpath(m, k, "deletion"))) for k in keys},
        "default": read_ctl(ctl(m) / "default-key"),
    }


def test_key_metadata_and_state_survive_unmount_remount_and_kill9(store):
    m = store.mount()
    create_key(m, "a")
    write_ctl(kpath(m, "a", "description"), "described")
    write_ctl(kpath(m, "a", "rotation"), "30")
    write_ctl(kpath(m, "a", "rotate"), "1")
    write_ctl(kpath(m, "a", "grants"), "uid:1234 use\ngid:99 admin\n")
    create_key(m, "b")
    write_ctl(ctl(m) / "default-key", "b")
    create_key(m, "c")
    write_ctl(kpath(m, "c", "state"), "Disabled")
    create_key(m, "d")
    write_ctl(kpath(m, "d", "deletion"), "10")
    transact(ctl(m) / "create-key", {"Alias": "e", "Origin": "EXTERNAL", "Description": "byok"})
    snapshot = _snapshot(m)
    m.kill9()
    m = store.mount()
    assert _snapshot(m) == snapshot
    m.unmount()
    m = store.mount()
    assert _snapshot(m) == snapshot
    assert info(m, "c")["KeyState"] == "Disabled" and info(m, "d")["KeyState"] == "PendingDelete"
    assert info(m, "e")["KeyState"] == "PendingImport"


def test_two_mounts_of_one_store_see_the_same_keys(store):
    m1 = store.mount()
    m2 = store.mount()
    meta = create_key(m1, "shared")
    assert "shared" in os.listdir(ctl(m2) / "keys")
    assert info(m2, "shared") == meta
    d = key_dir(m2, "d", "shared")
    (d / "f").write_bytes(b"from m2")
    assert (m1.path / "d" / "f").read_bytes() == b"from m2"

    write_ctl(kpath(m1, "shared", "state"), "Disabled")
    assert read_ctl(kpath(m2, "shared", "state")) == "Disabled\n"
    assert errno_of((m2.path / "d" / "f").read_bytes) == errno.EACCES
    write_ctl(kpath(m2, "shared", "state"), "Enabled")
    assert (m1.path / "d" / "f").read_bytes() == b"from m2"

    os.rename(kpath(m2, "shared"), kpath(m2, "renamed"))
    assert sorted(os.listdir(ctl(m1) / "keys")) == ["kmsfs-default", "renamed"]
    write_ctl(kpath(m1, "renamed", "rotate"), "1")
    (d / "g").write_bytes(b"v2")
    assert key_of(d / "g")["KeyVersion"] == 2  # m2 created it with m1's rotation
    # Both mounts write one audit log.
    assert any(e["operation"] == "UpdateAlias" for e in audit(m1))


def test_a_disable_through_another_mount_also_stops_cached_reads_of_open_files(store):
    m1 = store.mount()
    m2 = store.mount()
    create_key(m1, "shared")
    d = key_dir(m1, "d", "shared")
    (d / "f").write_bytes(b"abc" * 5000)
    fd = os.open(m2.path / "d" / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == (b"abc" * 34)[:100]  # cached in m2
        write_ctl(kpath(m1, "shared", "state"), "Disabled")
        wait_for(lambda: errno_of(os.pread, fd, 100, 0) == errno.EACCES, 3, "m2 to refuse the cached read")
    finally:
        os.close(fd)


# ====================================================================== small-data crypto


def test_encrypt_decrypt_reencrypt_and_generate_data_key_through_files(mounted):
    a = create_key(mounted, "a")
    b = create_key(mounted, "b")
    c = ctl(mounted)
    for plain in (b"", b"hello", os.urandom(4096)):
        answer = transact(kpath(mounted, "a", "encrypt"), {"Plaintext": b64(plain)})
        assert answer["KeyId"] == a["KeyId"]
        assert plain not in unb64(answer["CiphertextBlob"]) or not plain
        back = transact(c / "decrypt", {"CiphertextBlob": answer["CiphertextBlob"]})
        assert back == {"KeyId": a["KeyId"], "Plaintext": b64(plain)}

    context = json.dumps({"project": "x", "team": "y"})
    answer = transact(kpath(mounted, "a", "encrypt"), {"Plaintext": b64(b"ctx"), "EncryptionContext": context})
    blob = answer["CiphertextBlob"]
    reordered = json.dumps({"team": "y", "project": "x"})
    for ctx in (context, reordered):
        assert unb64(transact(c / "decrypt", {"CiphertextBlob": blob, "EncryptionContext": ctx})["Plaintext"]) == b"ctx"
    for wrong in (None, json.dumps({"project": "x"}), json.dumps({"project": "x", "team": "z"})):
        request = {"CiphertextBlob": blob}
        if wrong is not None:
            request["EncryptionContext"] = wrong
        assert errno_of(transact, c / "decrypt", request) == errno.EINVAL

    # The longest context is 1024 characters.
    longest = json.dumps({"k": "v" * 1015})
    assert len(longest) == 1024
    answer = transact(kpath(mounted, "a", "encrypt"), {"Plaintext": b64(b"long"), "EncryptionContext": longest})
    assert unb64(transact(c / "decrypt", {"CiphertextBlob": answer["CiphertextBlob"],
                                          "EncryptionContext": longest})["Plaintext"]) == b"long"

    # Re-encrypt under another key with another context.
    answer = transact(c / "reencrypt", {"CiphertextBlob": blob, "DestinationKeyId": "b",
                                        "SourceEncryptionContext": context,
                                        "DestinationEncryptionContext": json.dumps({"to": "b"})})
    assert answer["KeyId"] == b["KeyId"] and answer["SourceKeyId"] == a["KeyId"]
    assert answer["ReEncryptedKeyVersion"] == 1
    moved = answer["CiphertextBlob"]
    assert unb64(transact(c / "decrypt", {"CiphertextBlob": moved, "EncryptionContext": '{"to": "b"}'})["Plaintext"]) == b"ctx"
    assert errno_of(transact, c / "decrypt", {"CiphertextBlob": moved, "EncryptionContext": context}) == errno.EINVAL

    # Data keys.
    for spec, size in (("AES_256", 32), ("AES_128", 16)):
        for ctx in (None, '{"purpose": "backup"}'):
            request: dict[str, Any] = {"KeySpec": spec}
            if ctx:
                request["EncryptionContext"] = ctx
            dk = transact(kpath(mounted, "a", "generate-data-key"), request)
            assert len(unb64(dk["Plaintext"])) == size and dk["KeyId"] == a["KeyId"]
            back = {"CiphertextBlob": dk["CiphertextBlob"]}
            if ctx:
                back["EncryptionContext"] = ctx
                assert errno_of(transact, c / "decrypt", {"CiphertextBlob": dk["CiphertextBlob"]}) == errno.EINVAL
            assert transact(c / "decrypt", back)["Plaintext"] == dk["Plaintext"]
    assert len(unb64(transact(kpath(mounted, "a", "generate-data-key"), {})["Plaintext"])) == 32

    # Old ciphertexts stay decryptable after a rotation; new ones use the new version.
    write_ctl(kpath(mounted, "a", "rotate"), "1")
    assert unb64(transact(c / "decrypt", {"CiphertextBlob": blob, "EncryptionContext": context})["Plaintext"]) == b"ctx"
    again = transact(c / "reencrypt", {"CiphertextBlob": blob, "DestinationKeyId": a["KeyId"],
                                       "EncryptionContext": context})
    assert again["ReEncryptedKeyVersion"] == 2
    assert unb64(transact(c / "decrypt", {"CiphertextBlob": again["CiphertextBlob"],
                                          "EncryptionContext": context})["Plaintext"]) == b"ctx"


def test_transactional_files_answer_on_the_same_open_file(mounted):
    create_key(mounted, "a")
    fd = os.open(kpath(mounted, "a", "encrypt"), os.O_RDWR)
    try:
        # A request may arrive in pieces; the answer comes on the next read.
        os.write(fd, b'{"Plaintext": ')
        os.write(fd, b'"' + b64(b"one").encode() + b'"}')
        first = json.loads(os.read(fd, 65536))
        assert os.read(fd, 65536) == b""
        # A second request on the same open file gets its own answer.
        os.write(fd, json.dumps({"Plaintext": b64(b"two")}).encode())
        second = json.loads(os.read(fd, 65536))
    finally:
        os.close(fd)
    c = ctl(mounted)
    assert unb64(transact(c / "decrypt", {"CiphertextBlob": first["CiphertextBlob"]})["Plaintext"]) == b"one"
    assert unb64(transact(c / "decrypt", {"CiphertextBlob": second["CiphertextBlob"]})["Plaintext"]) == b"two"
    # Reading a transactional file without a request gives nothing.
    assert (c / "decrypt").read_bytes() == b""

    created = transact(c / "create-key", {"Alias": "by-txn", "Description": "made by a transaction"})
    meta = created["KeyMetadata"]
    assert meta == info(mounted, "by-txn")
    assert meta["Description"] == "made by a transaction" and meta["Origin"] == "KMSFS"
    assert meta["KeyState"] == "Enabled"


# ====================================================================== import (bring your own key)


def _wrap(pem: bytes, material: bytes, sha: str) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    public = serialization.load_pem_public_key(pem)
    digest = hashes.SHA1() if sha == "sha1" else hashes.SHA256()
    return public.encrypt(material, padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None))


def _open_blob_locally(material: bytes, blob: bytes, context: bytes = b"") -> bytes:
    """Decrypt a CiphertextBlob with the key material itself (proves the import used it)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    prefix = blob[:25]  # "KMSC" | version | key id | key version
    return AESGCM(material).decrypt(blob[25:37], blob[37:], prefix + context)


def test_import_external_key_material(mounted):
    store = mounted.store
    created = transact(ctl(mounted) / "create-key", {"Alias": "byok", "Origin": "EXTERNAL"})["KeyMetadata"]
    assert created["Origin"] == "EXTERNAL" and created["KeyState"] == "PendingImport"
    assert created["CurrentVersion"] == 0
    assert read_ctl(kpath(mounted, "byok", "state")) == "PendingImport\n"
    assert hsm_versions(store, created["KeyId"]) == {}
    d = key_dir(mounted, "d", "byok")
    assert errno_of((d / "early").write_bytes, b"x") == errno.EACCES

    pem = kpath(mounted, "byok", "import/wrapping-key.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    from cryptography.hazmat.primitives import serialization

    assert serialization.load_pem_public_key(pem).key_size == 3072
    assert kpath(mounted, "byok", "import/wrapping-key.pem").read_bytes() == pem  # stable

    material = os.urandom(32)
    # SoftHSM2 2.6 only unwraps RSAES-OAEP with SHA-1: SHA-256 is refused, clearly.
    count = len(audit(mounted))
    sha256 = _wrap(pem, material, "sha256")
    assert errno_of(write_ctl, kpath(mounted, "byok", "import/material"), sha256) == errno.EINVAL
    [refusal] = audit_since(mounted, count)
    assert refusal["operation"] == "ImportKeyMaterial" and refusal["result"] == "refused"
    assert "SHA-256" in refusal["reason"] and "SHA-1" in refusal["reason"]
    assert info(mounted, "byok")["KeyState"] == "PendingImport"

    write_ctl(kpath(mounted, "byok", "import/material"), _wrap(pem, material, "sha1"))
    imported = info(mounted, "byok")
    assert imported["KeyState"] == "Enabled" and imported["CurrentVersion"] == 1
    assert imported["Origin"] == "EXTERNAL"
    assert hsm_versions(store, created["KeyId"]) == {
        1: {"encrypt": True, "decrypt": True, "extractable": False, "sensitive": True}}

    (d / "f").write_bytes(b"under my own key")
    assert (d / "f").read_bytes() == b"under my own key"
    blob = transact(kpath(mounted, "byok", "encrypt"), {"Plaintext": b64(b"proof"),
                                                        "EncryptionContext": '{"k":"v"}'})["CiphertextBlob"]
    assert _open_blob_locally(material, unb64(blob), b'{"k":"v"}') == b"proof"
    assert [e for e in audit(mounted) if e["operation"] == "ImportKeyMaterial" and e["result"] == "ok"]
    mounted.unmount()
    m2 = store.mount()
    assert (m2.path / "d" / "f").read_bytes() == b"under my own key"


# ====================================================================== the CLI


def _cli_json(result: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(result.stdout)


@pytest.mark.parametrize("mode", ["mount", "store"])
def test_cli_key_commands(store, tmp_path, mode):
    m = store.mount()
    create_key(m, "proj")
    d = key_dir(m, "d", "proj")
    (d / "f").write_bytes(b"file under proj")
    if mode == "store":
        m.unmount()
        where = ["--store", str(store.backing)]
    else:
        where = ["--mount", str(m.path)]
    # Each --store call logs in to the HSM anew (about half a second): there,
    # intermediate results are checked less often, and all at the end.
    full = mode == "mount"

    def k(*args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return cli(store, "key", *where, *args, input=input, check=check)

    def state(name: str) -> str:
        return _cli_json(k("info", name))["KeyState"]

    status = _cli_json(k("status"))
    assert status["default_key"]["Alias"] == "kmsfs-default"
    listing = k("list").stdout.decode()
    assert "kmsfs-default" in listing and "proj" in listing and "(default)" in listing

    created = _cli_json(k("create", "cli-key"))
    assert created["Alias"] == "cli-key" and created["KeyState"] == "Enabled"
    described = _cli_json(k("create", "cli-desc", "--description", "with text"))
    assert described["Description"] == "with text"
    if full:
        assert {i["Alias"] for i in _cli_json(k("list", "--json"))} == {"kmsfs-default", "proj", "cli-key", "cli-desc"}
        assert _cli_json(k("info", "cli-key")) == created

    k("alias", "cli-key", "cli-renamed")
    assert _cli_json(k("info", "cli-renamed"))["KeyId"] == created["KeyId"]
    if full:
        assert k("info", "cli-key", check=False).returncode == 1
    k("describe", "cli-renamed", "a description")
    if full:
        assert _cli_json(k("info", "cli-renamed"))["Description"] == "a description"
    k("describe", "cli-renamed", "")  # clears it (checked at the end)

    k("disable", "cli-renamed")
    assert state("cli-renamed") == "Disabled"
    k("enable", "cli-renamed")
    if full:
        assert state("cli-renamed") == "Enabled"

    assert "now at version 2" in k("rotate", "proj").stdout.decode()
    k("rotation", "proj", "45")
    meta = _cli_json(k("info", "proj"))
    assert meta["KeyRotationEnabled"] is True and meta["RotateDays"] == 45
    k("rotation", "proj", "off")  # checked at the end

    out = k("delete", "cli-renamed", "7").stdout.decode()
    assert "deletion scheduled for" in out and "none" not in out
    if full:
        assert state("cli-renamed") == "PendingDelete"
    k("cancel-deletion", "cli-renamed")
    assert state("cli-renamed") == "Disabled"
    k("enable", "cli-renamed")

    progress = _cli_json(k("rewrap", "proj"))
    assert progress["state"] == "done" and progress["done"] == 1 and progress["failed"] == 0

    grants_file = tmp_path / "grants"
    grants_file.write_text("uid:1234 use\ngid:50 admin\n")
    k("grants", "proj", "--set", str(grants_file))
    if full:
        assert k("grants", "proj").stdout.decode() == "gid:50 admin\nuid:1234 use\n"
    k("grants", "proj", "--set", "-", input=b"uid:7 use\n")
    assert k("grants", "proj").stdout.decode() == "uid:7 use\n"

    if full:
        assert k("default").stdout.decode() == "kmsfs-default\n"
    k("default", "cli-desc")
    assert k("default").stdout.decode() == "cli-desc\n"
    k("default", "kmsfs-default")

    # Small-data crypto, with and without an encryption context.
    blob = _cli_json(k("encrypt", "proj", input=b"cli secret"))["CiphertextBlob"]
    assert k("decrypt", blob, "--raw").stdout == b"cli secret"
    if full:
        assert unb64(_cli_json(k("decrypt", blob))["Plaintext"]) == b"cli secret"
    ctx = '{"app": "cli"}'
    cblob = _cli_json(k("encrypt", "proj", "--context", ctx, input=b"with context"))["CiphertextBlob"]
    assert k("decrypt", cblob, "--context", ctx, "--raw").stdout == b"with context"
    wrong = k("decrypt", cblob, "--context", '{"app": "other"}', check=False)
    assert wrong.returncode == 1 and b"Invalid argument" in wrong.stderr and b"context" in wrong.stderr
    if full:
        missing = k("decrypt", cblob, check=False)
        assert missing.returncode == 1 and b"context" in missing.stderr
    moved = _cli_json(k("reencrypt", cblob, "cli-desc", "--context", ctx, "--destination-context", '{"to": "x"}'))
    assert moved["KeyId"] == described["KeyId"]
    assert k("decrypt", moved["CiphertextBlob"], "--context", '{"to": "x"}', "--raw").stdout == b"with context"
    if full:
        plain_moved = _cli_json(k("reencrypt", blob, "cli-desc"))
        assert k("decrypt", plain_moved["CiphertextBlob"], "--raw").stdout == b"cli secret"
        dk = _cli_json(k("generate-data-key", "proj"))
        assert len(unb64(dk["Plaintext"])) == 32
        assert _cli_json(k("decrypt", dk["CiphertextBlob"]))["Plaintext"] == dk["Plaintext"]
    dk = _cli_json(k("generate-data-key", "proj", "--key-spec", "AES_128", "--context", ctx))
    assert len(unb64(dk["Plaintext"])) == 16
    assert _cli_json(k("decrypt", dk["CiphertextBlob"], "--context", ctx))["Plaintext"] == dk["Plaintext"]

    # Bring your own key.
    external = _cli_json(k("create", "ext", "--external"))
    assert external["KeyState"] == "PendingImport" and external["Origin"] == "EXTERNAL"
    pem = k("wrapping-key", "ext").stdout
    material = os.urandom(32)
    bad = tmp_path / "sha256.bin"
    bad.write_bytes(_wrap(pem, material, "sha256"))
    refused = k("import", "ext", str(bad), check=False)
    assert refused.returncode == 1
    assert b"SHA-256" in refused.stderr and b"SHA-1" in refused.stderr, refused.stderr
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    refused = k("import", "ext", str(empty), check=False)
    assert refused.returncode == 1 and b"empty" in refused.stderr, refused.stderr
    if full:
        assert state("ext") == "PendingImport"
    good = tmp_path / "sha1.bin"
    good.write_bytes(_wrap(pem, material, "sha1"))
    imported = _cli_json(k("import", "ext", str(good)))
    assert imported["KeyState"] == "Enabled" and imported["CurrentVersion"] == 1
    eblob = _cli_json(k("encrypt", "ext", input=b"byok"))["CiphertextBlob"]
    assert _open_blob_locally(material, unb64(eblob)) == b"byok"

    log = [json.loads(line) for line in k("audit").stdout.splitlines()]
    ops = {e["operation"] for e in log if e["result"] == "ok"}
    assert {"CreateKey", "UpdateAlias", "UpdateKeyDescription", "DisableKey", "EnableKey", "RotateKey",
            "EnableKeyRotation", "DisableKeyRotation", "ScheduleKeyDeletion", "CancelKeyDeletion",
            "UpdateGrants", "SetDefaultKey", "Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey",
            "ImportKeyMaterial", "Rewrap"} <= ops

    # Whatever the CLI did is what a mount sees.
    if mode == "store":
        m = store.mount()
        # --store on a mounted store goes through the mount.
        assert _cli_json(cli(store, "key", "--store", str(store.backing), "info", "proj")) == info(m, "proj")
    assert key_of(m.path / "d" / "f")["KeyVersion"] == 2
    assert (m.path / "d" / "f").read_bytes() == b"file under proj"
    renamed = info(m, "cli-renamed")
    assert renamed["KeyState"] == "Enabled" and renamed["Description"] == "" and renamed["DeletionDate"] == 0
    assert info(m, "proj")["KeyRotationEnabled"] is False
    assert read_ctl(kpath(m, "proj", "grants")) == "uid:7 use\n"
    assert read_ctl(ctl(m) / "default-key") == "kmsfs-default\n"
    assert info(m, "ext")["KeyState"] == "Enabled"
    assert sorted(os.listdir(ctl(m) / "keys")) == ["cli-desc", "cli-renamed", "ext", "kmsfs-default", "proj"]


def test_cli_key_without_mount_or_store_outside_a_mount_says_what_to_do(store, tmp_path):
    result = subprocess.run([sys.executable, "-m", "kmsfs", "key", "list"], capture_output=True, text=True,
                            env=store.env, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "--mount" in result.stderr and "--store" in result.stderr
    m = store.mount()
    inside = subprocess.run([sys.executable, "-m", "kmsfs", "key", "list"], capture_output=True, text=True,
                            env=store.env, cwd=m.path, timeout=60, stdin=subprocess.DEVNULL)
    assert inside.returncode == 0 and "kmsfs-default" in inside.stdout
