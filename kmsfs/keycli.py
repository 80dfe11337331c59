"""``kmsfs key ...``: the control directory from the command line.

With ``--mount MOUNTPOINT`` (or when the current directory is inside a kmsfs
mount) every command reads and writes the files under ``MOUNTPOINT/.kmsfs/``,
exactly as a user with a shell would.  With ``--store BACKING`` and nothing
mounted, the same commands run against the store directly: the CLI logs in to
the HSM itself and drives the same control-directory logic in-process.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol


class CliError(Exception):
    pass


class ControlFiles(Protocol):
    def read(self, path: str) -> bytes: ...
    def write(self, path: str, data: bytes) -> None: ...
    def transact(self, path: str, request: dict[str, Any]) -> dict[str, Any]: ...
    def mkdir(self, path: str) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def close(self) -> None: ...


class MountedControl:
    """The control directory of a running mount."""

    def __init__(self, mountpoint: Path) -> None:
        self.root = mountpoint / ".kmsfs"
        if not (self.root / "status").exists():
            raise CliError(f"{mountpoint} is not a kmsfs mount (no .kmsfs/status)")

    def _fail(self, exc: OSError, what: str) -> CliError:
        reason = ""
        try:
            lines = (self.root / "audit.log").read_bytes().splitlines()
            if lines:
                last = json.loads(lines[-1])
                if last.get("result") != "ok":
                    reason = last.get("reason", "")
        except (OSError, ValueError):
            pass
        message = f"{what}: {os.strerror(exc.errno or errno.EIO)}"
        return CliError(f"{message} ({reason})" if reason else message)

    def read(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except OSError as exc:
            raise self._fail(exc, f"reading {path}") from None

    def write(self, path: str, data: bytes) -> None:
        try:
            fd = os.open(self.root / path, os.O_WRONLY)
            try:
                # A write(2) of nothing never reaches the daemon: send an empty line,
                # which the control files read as empty text (e.g. clear a description).
                os.write(fd, data or b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._fail(exc, f"writing {path}") from None

    def transact(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            fd = os.open(self.root / path, os.O_RDWR)
            try:
                os.write(fd, json.dumps(request).encode())
                chunks = []
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._fail(exc, path) from None
        return json.loads(b"".join(chunks))

    def mkdir(self, path: str) -> None:
        try:
            os.mkdir(self.root / path)
        except OSError as exc:
            raise self._fail(exc, f"creating {path}") from None

    def rename(self, old: str, new: str) -> None:
        try:
            os.rename(self.root / old, self.root / new)
        except OSError as exc:
            raise self._fail(exc, f"renaming {old}") from None

    def close(self) -> None:
        pass


class DirectControl:
    """The same control files, served in-process from an unmounted store."""

    def __init__(self, backing: Path) -> None:
        import pyfuse3  # noqa: F401  (the control logic reports errors as FUSEError)
        import trio

        from .controldir import ControlDir
        from .envelope import Envelope
        from .keyregistry import KeyRegistry, key_changes_settled
        from .keystore import HsmError, KeyStore
        from .kms import KeyService
        from .store import StoreError, load_config

        self._trio = trio
        # A refusal reaches the user as this command's own message; the control
        # directory's log line (meant for a daemon's log) would only repeat it.
        import logging

        logging.getLogger("kmsfs.controldir").setLevel(logging.ERROR)
        try:
            config = load_config(backing)
            # Not in the middle of a key change (its helper may outlive a killed daemon).
            with key_changes_settled(backing):
                self.keystore = KeyStore(config.uri(), config.hsm_env)
        except (StoreError, HsmError) as exc:
            raise CliError(str(exc)) from None
        registry = KeyRegistry(backing)
        self.kms = KeyService(backing, self.keystore, registry, admin_uid=os.getuid())
        self.envelope = Envelope(self.keystore, registry, config.block_size, config.format_version)
        self.backing = backing
        self.config = config

        def status() -> dict[str, Any]:
            return {"store_id": config.store_id, "format_version": config.format_version,
                    "block_size": config.block_size, "backing": str(backing.resolve()),
                    "hsm": {"module": config.uri().module_path, "token": config.uri().token,
                            "embedded": config.embedded_hsm},
                    **self.kms.status(), "mounted": False}

        async def no_invalidate(key_id: str) -> None:
            return None

        async def rewrap_now(record: Any) -> None:
            from .kms import RewrapProgress
            from .rewrap import rewrap_key

            progress = self.kms.rewraps[record.KeyId] = RewrapProgress()
            rewrap_key(backing, self.envelope, self.kms.snapshot().resolve(record.KeyId), progress)

        self.control = ControlDir(self.kms, status, rewrap_now, no_invalidate)

    def _node(self, path: str) -> Any:
        node = self.control.root
        for part in [p for p in path.split("/") if p]:
            node = self.control.lookup(node, part)
        return node

    def _call(self, fn: Any, what: str) -> Any:
        from pyfuse3 import FUSEError

        from .kms import KmsError

        try:
            return fn()
        except KmsError as exc:
            raise CliError(f"{what}: {exc}") from None
        except FUSEError as exc:
            reason = self._last_reason()
            message = f"{what}: {os.strerror(exc.errno)}"
            raise CliError(f"{message} ({reason})" if reason else message) from None

    def _last_reason(self) -> str:
        lines = self.kms.read_audit().splitlines()
        if lines:
            try:
                last = json.loads(lines[-1])
            except ValueError:
                return ""
            if last.get("result") != "ok":
                return str(last.get("reason", ""))
        return ""

    def read(self, path: str) -> bytes:
        from .kms import Caller

        caller = Caller(os.getuid(), os.getgid())
        return self._call(lambda: self.control._render(self._node(path), caller), f"reading {path}")

    def write(self, path: str, data: bytes) -> None:
        from .kms import Caller

        caller = Caller(os.getuid(), os.getgid())

        self._call(lambda: self._trio.run(self.control._command, self._node(path), data, caller),
                   f"writing {path}")

    def transact(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        from .kms import Caller

        caller = Caller(os.getuid(), os.getgid())
        raw = json.dumps(request).encode()
        answer = self._call(lambda: self.control._transact(self._node(path), raw, caller), path)
        return json.loads(answer)

    def mkdir(self, path: str) -> None:
        from .kms import Caller

        parent, _, name = path.rpartition("/")
        caller = Caller(os.getuid(), os.getgid())
        self._call(lambda: self._trio.run(self.control.mkdir, self._node(parent), name, caller), f"creating {path}")

    def rename(self, old: str, new: str) -> None:
        from .kms import Caller

        caller = Caller(os.getuid(), os.getgid())
        old_parent, _, old_name = old.rpartition("/")
        new_parent, _, new_name = new.rpartition("/")
        self._call(lambda: self._trio.run(self.control.rename, self._node(old_parent), old_name,
                                          self._node(new_parent), new_name, caller), f"renaming {old}")

    def close(self) -> None:
        self.keystore.close()


def _find_mount(start: Path) -> Path | None:
    path = start.resolve()
    for candidate in [path, *path.parents]:
        if (candidate / ".kmsfs" / "status").is_file():
            return candidate
    return None


def open_control(args: argparse.Namespace) -> ControlFiles:
    if args.mount:
        return MountedControl(Path(args.mount))
    if args.store:
        from .mounttable import is_mountpoint

        backing = Path(args.store)
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[0] == f"kmsfs:{backing.resolve()}" and is_mountpoint(Path(fields[1])):
                return MountedControl(Path(fields[1]))
        return DirectControl(backing)
    found = _find_mount(Path.cwd())
    if found is None:
        raise CliError("not inside a kmsfs mount: give --mount MOUNTPOINT or --store BACKING")
    return MountedControl(found)


# ---------------------------------------------------------------------- progress


def progress_bar(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width if total == 0 else int(width * done / total)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()


# ---------------------------------------------------------------------- commands


def _key_path(name: str, leaf: str = "") -> str:
    if "/" in name or name in ("", ".", ".."):
        raise CliError(f"{name!r} is not a key alias or id")
    return f"keys/{name}/{leaf}" if leaf else f"keys/{name}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def run(args: argparse.Namespace) -> int:
    if args.key_command == "rekey":
        return rekey(Path(args.path))
    control = open_control(args)
    try:
        return _dispatch(control, args)
    finally:
        control.close()


def _dispatch(c: ControlFiles, args: argparse.Namespace) -> int:
    cmd = args.key_command
    if cmd == "status":
        sys.stdout.write(c.read("status").decode())
    elif cmd == "list":
        status = json.loads(c.read("status"))
        default = (status.get("default_key") or {}).get("KeyId")
        infos = []
        for name in _list_keys(c):
            infos.append(json.loads(c.read(_key_path(name, "info"))))
        if args.json:
            _print_json(infos)
        else:
            print(f"{'ALIAS':20} {'KEYID':36} {'STATE':13} {'ORIGIN':8} VER")
            for info in infos:
                mark = " (default)" if info["KeyId"] == default else ""
                print(f"{info['Alias']:20} {info['KeyId']:36} {info['KeyState']:13} {info['Origin']:8} "
                      f"{info['CurrentVersion']}{mark}")
    elif cmd == "info":
        sys.stdout.write(c.read(_key_path(args.name, "info")).decode())
    elif cmd == "create":
        if args.external or args.description:
            answer = c.transact("create-key", {"Alias": args.name, "Description": args.description or "",
                                               "Origin": "EXTERNAL" if args.external else "KMSFS"})
            _print_json(answer["KeyMetadata"])
        else:
            c.mkdir(_key_path(args.name))
            sys.stdout.write(c.read(_key_path(args.name, "info")).decode())
    elif cmd == "alias":
        c.rename(_key_path(args.name), _key_path(args.new_alias))
    elif cmd == "describe":
        c.write(_key_path(args.name, "description"), args.text.encode())
    elif cmd in ("enable", "disable"):
        c.write(_key_path(args.name, "state"), b"Enabled" if cmd == "enable" else b"Disabled")
    elif cmd == "rotate":
        c.write(_key_path(args.name, "rotate"), b"1")
        info = json.loads(c.read(_key_path(args.name, "info")))
        print(f"{info['Alias']}: now at version {info['CurrentVersion']}")
    elif cmd == "rotation":
        c.write(_key_path(args.name, "rotation"), args.period.encode())
    elif cmd == "delete":
        c.write(_key_path(args.name, "deletion"), str(args.days).encode())
        print(f"{args.name}: deletion scheduled for {c.read(_key_path(args.name, 'deletion')).decode().strip()}")
    elif cmd == "cancel-deletion":
        c.write(_key_path(args.name, "deletion"), b"cancel")
    elif cmd == "rewrap":
        c.write(_key_path(args.name, "rewrap"), b"start")
        while True:
            progress = json.loads(c.read(_key_path(args.name, "rewrap")))
            progress_bar(progress["done"] + progress["skipped"] + progress["failed"], progress["total"], "rewrap")
            if progress["state"] != "running":
                break
            time.sleep(0.2)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        _print_json(progress)
        return 0 if progress["state"] == "done" else 1
    elif cmd == "grants":
        if args.set is not None:
            text = sys.stdin.read() if args.set == "-" else Path(args.set).read_text()
            c.write(_key_path(args.name, "grants"), text.encode())
        else:
            sys.stdout.write(c.read(_key_path(args.name, "grants")).decode())
    elif cmd == "default":
        if args.name:
            c.write("default-key", args.name.encode())
        else:
            sys.stdout.write(c.read("default-key").decode())
    elif cmd == "audit":
        sys.stdout.write(c.read("audit.log").decode())
    elif cmd == "encrypt":
        data = sys.stdin.buffer.read()
        request: dict[str, Any] = {"Plaintext": base64.b64encode(data).decode()}
        if args.context:
            request["EncryptionContext"] = args.context
        _print_json(c.transact(_key_path(args.name, "encrypt"), request))
    elif cmd == "generate-data-key":
        request = {"KeySpec": args.key_spec}
        if args.context:
            request["EncryptionContext"] = args.context
        _print_json(c.transact(_key_path(args.name, "generate-data-key"), request))
    elif cmd == "decrypt":
        request = {"CiphertextBlob": args.blob}
        if args.context:
            request["EncryptionContext"] = args.context
        answer = c.transact("decrypt", request)
        if args.raw:
            sys.stdout.buffer.write(base64.b64decode(answer["Plaintext"]))
        else:
            _print_json(answer)
    elif cmd == "reencrypt":
        request = {"CiphertextBlob": args.blob, "DestinationKeyId": args.destination}
        if args.context:
            request["SourceEncryptionContext"] = args.context
        if args.destination_context:
            request["DestinationEncryptionContext"] = args.destination_context
        _print_json(c.transact("reencrypt", request))
    elif cmd == "wrapping-key":
        sys.stdout.write(c.read(_key_path(args.name, "import/wrapping-key.pem")).decode())
    elif cmd == "import":
        material = Path(args.material).read_bytes()
        if not material:
            raise CliError(f"{args.material} is empty: no key material to import")
        c.write(_key_path(args.name, "import/material"), material)
        sys.stdout.write(c.read(_key_path(args.name, "info")).decode())
    else:  # pragma: no cover - argparse guards this
        raise CliError(f"unknown key command {cmd}")
    return 0


def _list_keys(c: ControlFiles) -> list[str]:
    if isinstance(c, MountedControl):
        return sorted(os.listdir(c.root / "keys"))
    assert isinstance(c, DirectControl)
    return [name for name, _ in c.control.children(c._node("keys"))]


def rekey(path: Path) -> int:
    """A fresh DEK for one file: copy it through the mount into a new file, then rename.

    The new file is made in a private work directory next to the file whose
    ``user.kmsfs.key`` and ``user.kmsfs.context`` are the old file's CMK and
    encryption context, so it gets the same key (at its newest version) and the
    same context, with a new random DEK and file id.  The old ciphertext is gone
    once the rename is done.  Mode, owner, times and user xattrs are kept.  A
    crash leaves either the old or the new file (plus the work directory).
    """
    if not path.is_file() or path.is_symlink():
        raise CliError(f"{path} is not a regular file")
    if _find_mount(path.parent) is None:
        raise CliError(f"{path} is not inside a kmsfs mount")
    st = path.stat()
    if st.st_nlink > 1:
        raise CliError(f"{path} has {st.st_nlink} hard links; rekeying would split them")
    key = json.loads(os.getxattr(path, "user.kmsfs.key"))
    try:
        context = os.getxattr(path, "user.kmsfs.context")
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        context = b"{}"  # none: an explicitly empty context, so the directory's does not apply
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.rekey.", dir=path.parent))
    tmp = workdir / "new"
    try:
        os.setxattr(workdir, "user.kmsfs.key", key["KeyId"].encode())
        os.setxattr(workdir, "user.kmsfs.context", context)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            total, done = st.st_size, 0
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                done += len(chunk)
                progress_bar(done, total, "rekey")
            dst.flush()
            os.fsync(dst.fileno())
        for name in os.listxattr(path):
            if not name.startswith("user.kmsfs"):
                os.setxattr(tmp, name, os.getxattr(path, name))
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        workdir.rmdir()
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(f"{path}: new data key, content re-encrypted")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "key", help="manage customer master keys (the .kmsfs/ control directory)",
        description="Key lifecycle as in a cloud KMS. Works through MOUNTPOINT/.kmsfs/ of a mount "
                    "(--mount, or the mount the current directory is in), or directly on an "
                    "unmounted store (--store).",
    )
    p.add_argument("--mount", metavar="MOUNTPOINT", help="a mounted kmsfs")
    p.add_argument("--store", metavar="BACKING", help="a store (used directly when not mounted)")
    ks = p.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    ks.add_parser("status", help="store status (JSON)")
    q = ks.add_parser("list", help="list keys")
    q.add_argument("--json", action="store_true")
    for name, text in [("info", "show a key's metadata (JSON)"), ("enable", "enable a key"),
                       ("disable", "disable a key (files under it become unreadable)"),
                       ("rotate", "create a new key version now"), ("rewrap", "rewrap all files onto the newest version"),
                       ("cancel-deletion", "cancel a scheduled deletion (the key returns Disabled)"),
                       ("wrapping-key", "print the RSA public key (PEM) for importing key material")]:
        q = ks.add_parser(name, help=text)
        q.add_argument("name", metavar="KEY")
    q = ks.add_parser("create", help="create a key")
    q.add_argument("name", metavar="ALIAS")
    q.add_argument("--description", default="")
    q.add_argument("--external", action="store_true", help="create for import of your own key material")
    q = ks.add_parser("alias", help="change a key's alias")
    q.add_argument("name", metavar="KEY")
    q.add_argument("new_alias", metavar="NEW_ALIAS")
    q = ks.add_parser("describe", help="set a key's description")
    q.add_argument("name", metavar="KEY")
    q.add_argument("text")
    q = ks.add_parser("rotation", help="automatic rotation: off, or a period of 7-365 days")
    q.add_argument("name", metavar="KEY")
    q.add_argument("period", metavar="off|DAYS")
    q = ks.add_parser("delete", help="schedule deletion after 7-30 days")
    q.add_argument("name", metavar="KEY")
    q.add_argument("days", type=int)
    q = ks.add_parser("grants", help="show, or with --set replace, a key's grants")
    q.add_argument("name", metavar="KEY")
    q.add_argument("--set", metavar="FILE", help="file with lines 'uid:N use|admin' or 'gid:N ...' (- for stdin)")
    q = ks.add_parser("default", help="show or set the default key for new files")
    q.add_argument("name", metavar="KEY", nargs="?")
    ks.add_parser("audit", help="print the audit log")
    q = ks.add_parser("encrypt", help="encrypt stdin (at most 4096 bytes) under a key")
    q.add_argument("name", metavar="KEY")
    q.add_argument("--context", metavar="JSON", help="encryption context, a JSON object of strings")
    q = ks.add_parser("generate-data-key", help="a new data key, in plaintext and encrypted")
    q.add_argument("name", metavar="KEY")
    q.add_argument("--key-spec", default="AES_256", choices=["AES_256", "AES_128"])
    q.add_argument("--context", metavar="JSON")
    q = ks.add_parser("decrypt", help="decrypt a CiphertextBlob")
    q.add_argument("blob", metavar="CIPHERTEXT_BLOB")
    q.add_argument("--context", metavar="JSON")
    q.add_argument("--raw", action="store_true", help="write the plaintext bytes to stdout")
    q = ks.add_parser("reencrypt", help="re-encrypt a CiphertextBlob under another key")
    q.add_argument("blob", metavar="CIPHERTEXT_BLOB")
    q.add_argument("destination", metavar="DESTINATION_KEY")
    q.add_argument("--context", metavar="JSON", help="the source encryption context")
    q.add_argument("--destination-context", metavar="JSON")
    q = ks.add_parser("import", help="import wrapped key material into an EXTERNAL key")
    q.add_argument("name", metavar="KEY")
    q.add_argument("material", metavar="FILE", help="32-byte AES key wrapped with RSAES-OAEP (SHA-1 for SoftHSM2) "
                                                        "under the wrapping key")
    q = ks.add_parser("rekey", help="give a file a fresh data key and re-encrypt its content")
    q.add_argument("path", metavar="PATH", help="a file inside a kmsfs mount")
    p.set_defaults(func=cmd_key)


def cmd_key(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except CliError as exc:
        print(f"kmsfs key: {exc}", file=sys.stderr)
        return 1


__all__ = ["add_parser", "cmd_key"]
