"""Every refusal of ``kmsfs init``, ``kmsfs mount`` and ``kmsfs umount``.

A refusal exits non-zero with a message that says what is wrong (the tests
assert on its words), changes nothing, and leaves no mount and no daemon
behind.  ``kmsfs mount`` is checked both in the background (the command
relays the daemon's message) and in the foreground (``-f``, the message is
logged to stderr).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kmsfs.pkcs11uri import Pkcs11Uri

from conftest import IN_CI, Store, is_mounted, make_store, require_fuse_and_hsm, run_kmsfs

MODES = ["background", "foreground"]


# --------------------------------------------------------------------------- helpers


def base_env(root: Path) -> dict[str, str]:
    """An environment whose embedded HSM state and runtime files live under ``root``."""
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(root / "state")
    env["XDG_RUNTIME_DIR"] = str(root / "run")
    (root / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    env.pop("SOFTHSM2_CONF", None)
    return env


def daemons_for(mountpoint: Path) -> list[int]:
    """Pids of kmsfs processes whose command line names ``mountpoint``."""
    target = str(mountpoint).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if b"kmsfs" in args and target in args:
            pids.append(int(entry))
    return pids


def refused_mount(env: dict[str, str], backing: Path, mountpoint: Path, *extra: str, mode: str) -> str:
    """Run ``kmsfs mount``, assert that it refuses cleanly, return what it said."""
    args = ["mount", *(["-f"] if mode == "foreground" else []), str(backing), str(mountpoint), *extra]
    try:
        result = run_kmsfs(*args, env=env, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        _unmount_if_mounted(mountpoint)  # a foreground mount that was not refused: killed by run()
        raise
    if result.returncode == 0:
        _unmount_if_mounted(mountpoint)
    assert result.returncode != 0, f"kmsfs {' '.join(args)} succeeded:\n{result.stdout}\n{result.stderr}"
    assert result.stdout == "", result.stdout
    if mode == "background":
        assert result.stderr.startswith("kmsfs mount: "), result.stderr
    else:
        assert "mount refused: " in result.stderr, result.stderr
        assert "refused" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr
    if mountpoint.exists():
        assert not is_mounted(mountpoint)
    assert daemons_for(mountpoint) == []
    return result.stderr


def _unmount_if_mounted(mountpoint: Path) -> None:
    """Leave no mount behind when a mount that should have been refused was not."""
    if mountpoint.exists() and is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, capture_output=True)


def assert_words(text: str, *words: str) -> None:
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in:\n{text}"


def uri_of(store_backing: Path) -> Pkcs11Uri:
    config = json.loads((store_backing / ".kmsfs.d" / "config.json").read_text())
    return Pkcs11Uri.parse(config["hsm"]["uri"])


def store_bytes(backing: Path) -> dict[str, bytes]:
    d = backing / ".kmsfs.d"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.endswith(".json")}


@contextmanager
def no_user_xattr_fs(path: Path) -> Iterator[Path]:
    """A ramfs on ``path``: a filesystem that rejects user.* xattrs."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI=true: mounting a ramfs needs root", pytrace=False)
        pytest.skip("mounting a ramfs (a filesystem without user xattrs) needs root")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        if IN_CI:
            pytest.fail(f"CI=true: mount -t ramfs failed: {result.stderr.strip()}", pytrace=False)
        pytest.skip(f"cannot mount a ramfs here: {result.stderr.strip()}")
    try:
        probe = path / "probe"
        probe.touch()
        with pytest.raises(OSError):
            os.setxattr(probe, "user.test", b"1")
        probe.unlink()
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Store]:
    """One store for every mount refusal; the refusals must leave it as it was."""
    s = make_store(tmp_path_factory.mktemp("refusals") / "s")
    before = store_bytes(s.backing)
    try:
        yield s
    finally:
        for m in s.mounts:
            m.cleanup()
    assert store_bytes(s.backing) == before


@pytest.fixture
def mnt(shared: Store, tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- help


def test_top_level_help():
    result = run_kmsfs("--help")
    assert result.returncode == 0
    assert_words(result.stdout, "usage: kmsfs", "init", "mount", "umount", "PKCS#11", "HSM", "AES-256-GCM",
                 "kmsfs init ~/vault.enc")


@pytest.mark.parametrize("command,words", [
    ("init", ("usage: kmsfs init", "BACKING", "--pkcs11", "--block-size", "--state-dir", "SoftHSM2",
              "power of two", "Refuses")),
    ("mount", ("usage: kmsfs mount", "BACKING", "MOUNTPOINT", "--foreground", "-o", "--pkcs11",
               "--log-file", "background", "Refuses")),
    ("umount", ("usage: kmsfs umount", "MOUNTPOINT", "Unmount", "fusermount3")),
])
def test_subcommand_help(command, words):
    result = run_kmsfs(command, "--help")
    assert result.returncode == 0
    assert_words(result.stdout, *words)
    assert "--ready-fd" not in result.stdout  # internal


def test_no_command_and_unknown_command():
    result = run_kmsfs(check=False)
    assert result.returncode == 2
    assert_words(result.stderr, "usage: kmsfs", "required")
    result = run_kmsfs("frobnicate", check=False)
    assert result.returncode == 2
    assert_words(result.stderr, "invalid choice")


def test_version():
    from kmsfs import __version__

    result = run_kmsfs("--version")
    assert result.stdout.strip() == f"kmsfs {__version__}"


# --------------------------------------------------------------------------- init


def test_init_refuses_an_existing_store(store: Store):
    before = store_bytes(store.backing)
    assert set(before) >= {"config.json", "keys.json"}
    tokens_before = sorted(p.name for p in (store.state_dir / "tokens").iterdir())
    for extra in ([], ["--block-size", "8192"]):
        result = store.kmsfs("init", str(store.backing), *extra, check=False)
        assert result.returncode == 1
        assert_words(result.stderr, "already a kmsfs store", "refusing to overwrite")
        assert store_bytes(store.backing) == before
    assert sorted(p.name for p in (store.state_dir / "tokens").iterdir()) == tokens_before
    m = store.mount()  # still a working store
    (m.path / "x").write_text("ok")
    assert (m.path / "x").read_text() == "ok"


def test_init_refuses_a_non_empty_directory(tmp_path: Path):
    env = base_env(tmp_path)
    backing = tmp_path / "full"
    backing.mkdir()
    (backing / "plain.txt").write_text("not encrypted")
    result = run_kmsfs("init", str(backing), env=env, check=False)
    assert result.returncode == 1
    assert_words(result.stderr, "is not empty", "empty directory", "through the mount")
    assert sorted(os.listdir(backing)) == ["plain.txt"]
    assert not (tmp_path / "state").exists()  # no token was made


def test_init_refuses_a_file(tmp_path: Path):
    env = base_env(tmp_path)
    backing = tmp_path / "afile"
    backing.write_text("x")
    result = run_kmsfs("init", str(backing), env=env, check=False)
    assert result.returncode == 1
    assert_words(result.stderr, "exists and is not a directory")
    assert backing.read_text() == "x"


def test_init_refuses_a_leftover_store_directory(tmp_path: Path):
    env = base_env(tmp_path)
    backing = tmp_path / "half"
    (backing / ".kmsfs.d").mkdir(parents=True)
    result = run_kmsfs("init", str(backing), env=env, check=False)
    assert result.returncode == 1
    assert_words(result.stderr, "holds no config", "interrupted init", "Remove it")
    assert os.listdir(backing / ".kmsfs.d") == []


@pytest.mark.parametrize("size", ["0", "1", "1000", "2048", "3000", "4095", "6144", "2097152", "-4096"])
def test_init_refuses_a_bad_block_size(tmp_path: Path, size):
    env = base_env(tmp_path)
    backing = tmp_path / "b"
    result = run_kmsfs("init", str(backing), f"--block-size={size}", env=env, check=False)
    assert result.returncode == 1
    assert_words(result.stderr, f"block size {size} must be a power of two from 4096 to 1048576")
    assert "Traceback" not in result.stderr
    assert not backing.exists()


@pytest.mark.parametrize("size", ["abc", "4k", "", "4096.0"])
def test_init_refuses_a_non_numeric_block_size(tmp_path: Path, size):
    result = run_kmsfs("init", str(tmp_path / "b"), f"--block-size={size}", env=base_env(tmp_path), check=False)
    assert result.returncode == 2
    assert_words(result.stderr, "--block-size", "invalid int value")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("uri,words", [
    ("token=x", ("starts with 'pkcs11:'",)),
    ("/usr/lib/softhsm/libsofthsm2.so", ("starts with 'pkcs11:'",)),
    ("pkcs11:", ("must name the token",)),
    ("pkcs11:?module-path=/m.so&pin-value=1", ("must name the token",)),
    ("pkcs11:token=x", ("must give the module", "module-path")),
    ("pkcs11:token=x?pin-value=1", ("must give the module",)),
    ("pkcs11:token=x?module-path=/m.so", ("must give a PIN", "pin-source", "pin-value")),
    ("pkcs11:token=x;serial?module-path=/m.so&pin-value=1", ("malformed PKCS#11 URI attribute", "serial")),
    ("pkcs11:token=x?module-path=/m.so&pin-value", ("malformed PKCS#11 URI attribute", "pin-value")),
])
def test_init_refuses_a_malformed_pkcs11_uri(tmp_path: Path, uri, words):
    env = base_env(tmp_path)
    backing = tmp_path / "b"
    result = run_kmsfs("init", str(backing), "--pkcs11", uri, env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("kmsfs init: ")
    assert_words(result.stderr, *words)
    assert not backing.exists()


def test_init_refuses_a_missing_pkcs11_module_and_leaves_nothing(tmp_path: Path):
    require_fuse_and_hsm()
    env = base_env(tmp_path)
    backing = tmp_path / "b"
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    uri = f"pkcs11:token=t?module-path=/nonexistent/libnothing.so&pin-source=file:{pin}"
    result = run_kmsfs("init", str(backing), "--pkcs11", uri, env=env, check=False)
    assert result.returncode == 1
    assert_words(result.stderr, "PKCS#11 module /nonexistent/libnothing.so does not exist")
    assert "1234" not in result.stderr
    assert not (backing / ".kmsfs.d").exists()
    # Nothing half-made is in the way of a second try.
    run_kmsfs("init", str(backing), env=env)
    assert (backing / ".kmsfs.d" / "config.json").exists()


def test_init_refuses_a_pin_value_because_the_uri_is_saved(tmp_path: Path):
    require_fuse_and_hsm()
    backing = tmp_path / "b"
    uri = "pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=secret-1234"
    result = run_kmsfs("init", str(backing), "--pkcs11", uri, env=base_env(tmp_path), check=False)
    assert result.returncode == 1
    assert_words(result.stderr, "pin-source=file:", "never written to the store")
    assert "secret-1234" not in result.stderr
    assert not (backing / ".kmsfs.d").exists()


def test_init_refuses_an_unknown_token_and_a_wrong_pin(store: Store, tmp_path: Path):
    uri = uri_of(store.backing)
    env = {**base_env(tmp_path), "SOFTHSM2_CONF": str(store.state_dir / "softhsm2.conf")}
    one = tmp_path / "pin1"
    one.write_text("1\n")
    wrong = tmp_path / "pin-wrong"
    wrong.write_text("wrong-pin\n")
    cases = [
        (Pkcs11Uri("no-such-token", uri.module_path, pin_source=f"file:{one}"), ("no PKCS#11 token labelled 'no-such-token'",)),
        (Pkcs11Uri(uri.token, uri.module_path, pin_source=f"file:{wrong}"), ("PIN", "is wrong")),
    ]
    for n, (bad, words) in enumerate(cases):
        backing = tmp_path / f"b{n}"
        result = run_kmsfs("init", str(backing), "--pkcs11", str(bad), env=env, check=False)
        assert result.returncode == 1
        assert_words(result.stderr, *words)
        assert "wrong-pin" not in result.stderr
        assert not (backing / ".kmsfs.d").exists()


def test_init_refuses_a_filesystem_without_user_xattrs(tmp_path: Path):
    require_fuse_and_hsm()
    env = base_env(tmp_path)
    with no_user_xattr_fs(tmp_path / "ramfs") as fs:
        backing = fs / "b"
        result = run_kmsfs("init", str(backing), env=env, check=False)
        assert result.returncode == 1
        assert_words(result.stderr, "does not support user extended attributes", "user.kmsfs", "user_xattr")
        assert not (backing / ".kmsfs.d").exists()
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.pin"))


# --------------------------------------------------------------------------- mount


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_an_uninitialised_directory(shared: Store, mnt: Path, tmp_path: Path, mode):
    for backing in (tmp_path / "empty", tmp_path / "missing"):
        if backing.name == "empty":
            backing.mkdir()
        err = refused_mount(shared.env, backing, mnt, mode=mode)
        assert_words(err, f"{backing} is not a kmsfs store", f"kmsfs init {backing}")


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_damaged_or_future_config(shared: Store, mnt: Path, tmp_path: Path, mode):
    backing = tmp_path / "copy"
    (backing / ".kmsfs.d").mkdir(parents=True)
    shutil.copy(shared.backing / ".kmsfs.d" / "keys.json", backing / ".kmsfs.d")
    config = json.loads((shared.backing / ".kmsfs.d" / "config.json").read_text())
    path = backing / ".kmsfs.d" / "config.json"
    path.write_text("{not json")
    assert_words(refused_mount(shared.env, backing, mnt, mode=mode), "config.json is damaged", "not JSON")
    path.write_text(json.dumps({**config, "format": 3}))
    assert_words(refused_mount(shared.env, backing, mnt, mode=mode),
                 "format version 3", "this kmsfs reads version 1, 2", "release that created it")


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_missing_hsm_module(shared: Store, mnt: Path, mode):
    uri = "pkcs11:token=t?module-path=/nonexistent.so&pin-value=secret-pin"
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", uri, mode=mode)
    assert_words(err, "PKCS#11 module /nonexistent.so does not exist")
    assert "secret-pin" not in err


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_malformed_pkcs11_override(shared: Store, mnt: Path, mode):
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", "pkcs11:token=x", mode=mode)
    assert_words(err, "bad PKCS#11 URI", "module-path")


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_an_unknown_token(shared: Store, mnt: Path, mode):
    uri = uri_of(shared.backing)
    bad = Pkcs11Uri("kmsfs-no-such-token", uri.module_path, pin_source=uri.pin_source)
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", str(bad), mode=mode)
    assert_words(err, "no PKCS#11 token labelled 'kmsfs-no-such-token'", uri.module_path)


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_wrong_pin_value(shared: Store, mnt: Path, mode):
    uri = uri_of(shared.backing)
    bad = Pkcs11Uri(uri.token, uri.module_path, pin_value="wrong-pin-123")
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", str(bad), mode=mode)
    assert_words(err, f"the PIN for token {uri.token!r} is wrong")
    assert "wrong-pin-123" not in err


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_pin_file_with_a_wrong_pin(shared: Store, mnt: Path, tmp_path: Path, mode):
    uri = uri_of(shared.backing)
    pin_file = tmp_path / "pin"
    pin_file.write_text("not-the-pin\n")
    bad = Pkcs11Uri(uri.token, uri.module_path, pin_source=f"file:{pin_file}")
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", str(bad), mode=mode)
    assert_words(err, "PIN", "is wrong")
    assert "not-the-pin" not in err


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_missing_pin_file(shared: Store, mnt: Path, tmp_path: Path, mode):
    uri = uri_of(shared.backing)
    bad = Pkcs11Uri(uri.token, uri.module_path, pin_source=f"file:{tmp_path / 'no-pin-here'}")
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", str(bad), mode=mode)
    assert_words(err, f"cannot read the PIN file {tmp_path / 'no-pin-here'}", "No such file")


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_missing_mountpoint(shared: Store, tmp_path: Path, mode):
    missing = tmp_path / "nowhere"
    err = refused_mount(shared.env, shared.backing, missing, mode=mode)
    assert_words(err, f"mountpoint {missing} does not exist", "mkdir")
    assert not missing.exists()


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_file_as_mountpoint(shared: Store, tmp_path: Path, mode):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = refused_mount(shared.env, shared.backing, afile, mode=mode)
    assert_words(err, f"mountpoint {afile} is not a directory")
    assert afile.read_text() == "x"


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_mountpoint_inside_the_backing_store(shared: Store, mode):
    inside = shared.backing / "inside"
    inside.mkdir()
    link = shared.root / f"link-{mode}"
    link.symlink_to(inside)
    try:
        for target in (inside, shared.backing, link):
            err = refused_mount(shared.env, shared.backing, target, mode=mode)
            assert_words(err, f"mountpoint {target} lies inside the backing store {shared.backing}")
    finally:
        link.unlink()
        inside.rmdir()


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_an_existing_mountpoint(shared: Store, mode):
    m = shared.mount()
    try:
        (m.path / "f").write_text("still here")
        args = ["mount", *(["-f"] if mode == "foreground" else []), str(shared.backing), str(m.path)]
        result = run_kmsfs(*args, env=shared.env, check=False, timeout=60)
        assert result.returncode != 0
        assert_words(result.stderr, f"{m.path} is already a mountpoint", "unmount it first")
        # The first mount is unharmed, and it is the only daemon on it.
        assert (m.path / "f").read_text() == "still here"
        assert daemons_for(m.path) == [m.proc.pid]
    finally:
        m.unmount()


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_token_without_the_default_key(shared: Store, mnt: Path, mode):
    # A second store whose token lives next to the first one's (same SoftHSM2 state).
    other = shared.root / f"other-{mode}"
    run_kmsfs("init", str(other), env=shared.env)
    other_uri = uri_of(other)
    assert other_uri.token != uri_of(shared.backing).token
    default = json.loads((shared.backing / ".kmsfs.d" / "keys.json").read_text())["default_key"]
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", str(other_uri), mode=mode)
    assert_words(err, f"the default CMK {default} is not on token {other_uri.token!r}",
                 "the HSM the store was created with")
    uuid.UUID(default)


@pytest.mark.parametrize("mode", MODES)
def test_mount_refuses_a_backing_filesystem_without_user_xattrs(shared: Store, mnt: Path, tmp_path: Path, mode):
    with no_user_xattr_fs(tmp_path / "ramfs") as fs:
        backing = fs / "copy"
        shutil.copytree(shared.backing / ".kmsfs.d", backing / ".kmsfs.d")
        err = refused_mount(shared.env, backing, mnt, mode=mode)
        assert_words(err, "does not support user extended attributes", "user.kmsfs")
        assert not any(p.name.startswith(".kmsfs-xattr-probe") for p in (backing / ".kmsfs.d").iterdir())


def test_mount_still_works_after_the_refusals(shared: Store):
    m = shared.mount()
    (m.path / "after").write_bytes(b"fine")
    m.unmount()
    m2 = shared.mount()
    assert (m2.path / "after").read_bytes() == b"fine"
    m2.unmount()


# --------------------------------------------------------------------------- umount


def test_umount_of_a_directory_that_is_not_mounted(tmp_path: Path):
    env = base_env(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    for target in (plain, tmp_path / "missing"):
        result = run_kmsfs("umount", str(target), env=env, check=False)
        assert result.returncode == 1
        assert result.stderr.strip() == f"kmsfs umount: {target} is not mounted"
    assert plain.is_dir()



# --------------------------------------------------------------------------- untrusted config


def test_mount_refuses_a_module_inside_the_store_or_writable_by_others(shared: Store, mnt: Path, tmp_path: Path):
    """config.json lives in the backing store: it must not be able to load code of its choosing."""
    uri = uri_of(shared.backing)
    planted = shared.backing / "evil.so"
    shutil.copy(uri.module_path, planted)
    try:
        override = str(Pkcs11Uri(uri.token, str(planted), uri.pin_source))
        err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", override, mode="foreground")
        assert_words(err, "inside the backing store")
    finally:
        planted.unlink()
    writable = tmp_path / "libwritable.so"
    shutil.copy(uri.module_path, writable)
    writable.chmod(0o666)
    override = str(Pkcs11Uri(uri.token, str(writable), uri.pin_source))
    err = refused_mount(shared.env, shared.backing, mnt, "--pkcs11", override, mode="background")
    assert_words(err, "not writable by group or others")


def test_mount_refuses_environment_other_than_the_module_config(tmp_path: Path, mnt: Path):
    store = make_store(tmp_path / "env")
    path = store.backing / ".kmsfs.d" / "config.json"
    config = json.loads(path.read_text())
    config["hsm"]["env"]["LD_PRELOAD"] = "/tmp/evil.so"
    path.write_text(json.dumps(config))
    err = refused_mount(store.env, store.backing, mnt, mode="foreground")
    assert_words(err, "refusing to set LD_PRELOAD")


def test_mount_explains_a_missing_embedded_state_directory(tmp_path: Path, mnt: Path):
    store = make_store(tmp_path / "gone")
    shutil.move(str(store.state_dir), str(tmp_path / "moved-state"))
    err = refused_mount(store.env, store.backing, mnt, mode="background")
    assert_words(err, "softhsm2.conf is missing", "state directory")
