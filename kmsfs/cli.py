"""The ``kmsfs`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from . import __version__

log = logging.getLogger(__name__)

DESCRIPTION = """\
kmsfs mounts a backing directory through FUSE and encrypts every file in it
with its own data key (AES-256-GCM), wrapped by a customer master key that
lives in a PKCS#11 HSM (SoftHSM2 by default).

Typical use:
  kmsfs init ~/vault.enc            # create a store (and its SoftHSM2 token)
  mkdir -p ~/vault
  kmsfs mount ~/vault.enc ~/vault   # use ~/vault like any directory
  kmsfs umount ~/vault
"""

READY_TIMEOUT = 120.0


def _setup_logging(level: int, log_file: str | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pyfuse3 logs every FUSEError at debug level; keep its noise down.
    logging.getLogger("pyfuse3").setLevel(max(level, logging.INFO))


def _state_dir(args: argparse.Namespace) -> Path:
    from .embedded_hsm import default_state_dir

    return Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()


# ---------------------------------------------------------------------- init


def cmd_init(args: argparse.Namespace) -> int:
    from .embedded_hsm import EmbeddedHsmError
    from .initstore import init_store
    from .keystore import HsmError
    from .pkcs11uri import Pkcs11Uri, UriError
    from .store import StoreError

    _setup_logging(logging.WARNING)
    try:
        uri = Pkcs11Uri.parse(args.pkcs11) if args.pkcs11 else None
        result = init_store(Path(args.backing), _state_dir(args), uri, args.block_size)
    except (StoreError, HsmError, UriError, EmbeddedHsmError, ValueError) as exc:
        print(f"kmsfs init: {exc}", file=sys.stderr)
        return 1
    print(f"Initialised kmsfs store {args.backing}")
    print(f"  store id:    {result.store_id}")
    print(f"  default key: {result.key_id} (alias {result.key_alias})")
    print(f"  HSM:         {result.hsm_description}")
    return 0


# ---------------------------------------------------------------------- mount


def _daemon_log_file(args: argparse.Namespace) -> str:
    if args.log_file:
        return str(Path(args.log_file).expanduser())
    from .mount import pidfile_for

    return str(pidfile_for(Path(args.mountpoint)).with_suffix(".log"))


def cmd_mount(args: argparse.Namespace) -> int:
    backing = Path(args.backing)
    mountpoint = Path(args.mountpoint)
    level = logging.DEBUG if args.debug else logging.INFO
    if args.foreground:
        _setup_logging(level, args.log_file)
        from .mount import serve

        ready_fd = args.ready_fd
        if ready_fd is not None:
            os.set_inheritable(ready_fd, False)
        status = serve(backing, mountpoint, args.options, args.pkcs11, ready_fd)
        if status != 0 and ready_fd is None:
            where = f"the log in {args.log_file}" if args.log_file else "the log above"
            print(f"kmsfs mount: refused; see {where}", file=sys.stderr)
        return status
    return _mount_in_background(args, backing, mountpoint)


def _mount_in_background(args: argparse.Namespace, backing: Path, mountpoint: Path) -> int:
    log_file = _daemon_log_file(args)
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "kmsfs", "mount", "-f", "--ready-fd", str(write_end),
               "--log-file", log_file, str(backing), str(mountpoint)]
    for option in args.options:
        command += ["-o", option]
    if args.pkcs11:
        command += ["--pkcs11", args.pkcs11]
    if args.debug:
        command.append("--debug")
    child = subprocess.Popen(
        command, pass_fds=(write_end,), start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log_file, "ab"),
    )
    os.close(write_end)
    text = _read_ready_message(read_end, READY_TIMEOUT)
    if text == "READY":
        print(f"kmsfs: {backing} mounted on {mountpoint} (pid {child.pid}, log {log_file})")
        return 0
    try:
        status = child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()  # our own child, by pid: it neither mounted nor exited
        status = child.wait()
    if text.startswith("ERROR "):
        print(f"kmsfs mount: {text[len('ERROR '):]}", file=sys.stderr)
    else:
        print(f"kmsfs mount: the daemon exited with status {status} before mounting; see {log_file}",
              file=sys.stderr)
    return 1


def _read_ready_message(fd: int, timeout: float) -> str:
    """The daemon's first line on the pipe: READY, ERROR <why>, or "" if it died or hung."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").split("\n", 1)[0].strip()


def cmd_fsck(args: argparse.Namespace) -> int:
    import json

    from .fsck import EXIT_CLEAN, EXIT_DAMAGE, EXIT_UNABLE, STRIPPED_XATTRS_MESSAGE, FsckError, check_store
    from .mounttable import mounted_store_mountpoint

    _setup_logging(logging.ERROR)
    backing = Path(args.backing)
    where = mounted_store_mountpoint(backing)
    if where is not None:
        print(f"kmsfs fsck: {backing} is mounted on {where}; unmount it first", file=sys.stderr)
        return EXIT_UNABLE
    tty = sys.stderr.isatty() and not args.json

    def progress(count: int, path: str) -> None:
        if tty and count % 50 == 0:
            sys.stderr.write(f"\rchecked {count} files ... {path[-40:]:40}")
            sys.stderr.flush()

    try:
        report = check_store(backing, progress)
    except FsckError as exc:
        print(f"kmsfs fsck: cannot check {backing}: {exc}", file=sys.stderr)
        return EXIT_UNABLE
    if tty:
        sys.stderr.write("\r" + " " * 70 + "\r")
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for damage in report.damaged:
            blocks = f" (blocks {', '.join(map(str, damage.blocks))})" if damage.blocks else ""
            print(f"{_printable_path(damage.path)}: {damage.cause}{blocks}: {_printable_path(damage.detail)}")
        if report.stripped_xattrs:
            print(f"kmsfs fsck: {STRIPPED_XATTRS_MESSAGE}")
        if report.pending_truncates:
            print(f"kmsfs fsck: {report.pending_truncates} truncate(s) interrupted by a crash are saved in "
                  f".kmsfs.d/truncating/; the next kmsfs mount completes them (nothing is lost)")
        state = "clean" if not report.damaged else f"{len(report.damaged)} damaged"
        print(f"kmsfs fsck: {report.files} files, {report.bytes} bytes checked: {state}")
    return EXIT_CLEAN if not report.damaged else EXIT_DAMAGE


def _printable_path(path: str) -> str:
    """A path for one line of a report: bytes that are not UTF-8 (surrogate escapes),
    control characters and backslashes escaped, so that no name can break a line,
    forge another one, or fail to print under a UTF-8 locale."""
    out = []
    for ch in path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode gives it
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def cmd_headers(args: argparse.Namespace) -> int:
    from .headers import HeadersError, export_headers, import_headers

    _setup_logging(logging.WARNING)
    try:
        if args.headers_command == "export":
            count = export_headers(Path(args.backing), Path(args.file))
            print(f"exported {count} headers to {args.file} (they hold no secret: every data key is wrapped by the HSM)")
            return 0
        result = import_headers(Path(args.backing), Path(args.file), force=args.force)
    except HeadersError as exc:
        print(f"kmsfs headers: {exc}", file=sys.stderr)
        return 1
    print(f"restored {result.restored}, already in place {result.already}, files missing "
          f"{result.missing_files}, not matching their file {result.mismatched}, "
          f"left alone (different header; --force to replace) {result.skipped_different}")
    return 0 if result.mismatched == 0 else 1


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import MountError, unmount

    try:
        unmount(Path(args.mountpoint))
    except MountError as exc:
        print(f"kmsfs umount: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmsfs", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kmsfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "init", help="make a directory a kmsfs store",
        description="Make BACKING (empty or new) a kmsfs store and create its filesystem-managed "
                    "default CMK. Without --pkcs11 a SoftHSM2 token of kmsfs's own is created "
                    "in the state directory, with a random PIN in a 0600 file. Refuses to touch "
                    "an existing store.",
    )
    p.add_argument("backing", metavar="BACKING", help="directory that will hold the ciphertext")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the embedded SoftHSM2 token and its PIN live "
                        "(default: $XDG_DATA_HOME/kmsfs or ~/.local/share/kmsfs)")
    p.add_argument("--pkcs11", metavar="URI",
                   help="use an existing token: 'pkcs11:token=LABEL?module-path=/path/module.so"
                        "&pin-source=file:/path/to/pin' (RFC 7512)")
    p.add_argument("--block-size", type=int, metavar="BYTES",
                   help="on-disk content block size, a power of two from 4096 to 1048576 (default "
                        "4096: one page, so a crash never tears a block); each block holds this "
                        "many bytes minus 28 (nonce and tag) of file data")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "mount", help="mount a store",
        description="Mount the store BACKING on MOUNTPOINT. Returns once the mount is ready and "
                    "keeps serving in the background (use -f to stay in the foreground). "
                    "Refuses with a message when the store, the HSM, the PIN, xattr support or "
                    "the mountpoint is not usable.",
    )
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="FUSE mount options, comma-separated (allow_other, ro, ...)")
    p.add_argument("--pkcs11", metavar="URI", help="override the HSM URI recorded in the store")
    p.add_argument("--log-file", metavar="FILE", help="log here (default: stderr with -f, else a file "
                                                     "in the runtime directory, printed at mount)")
    p.add_argument("--debug", action="store_true", help="log every failed operation")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser(
        "umount", help="flush and unmount",
        description="Unmount MOUNTPOINT and wait for its daemon to finish. "
                    "'fusermount3 -u MOUNTPOINT' works as well.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser(
        "fsck", help="check every header and block of an unmounted store",
        description="Check every file's header with the HSM and every block of an unmounted store, "
                    "and list each damaged file with its cause and block numbers. Changes nothing. "
                    "Exit status: 0 clean, 4 damage found, 8 unable to check.",
    )
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser(
        "headers", help="export or import the wrapped file headers (backup of the xattrs)",
        description="The per-file headers (xattr user.kmsfs) hold each file's wrapped data key. "
                    "A copy of the store made without xattrs loses them; an export restores them. "
                    "The export holds no secret.",
    )
    hs = p.add_subparsers(dest="headers_command", metavar="COMMAND", required=True)
    q = hs.add_parser("export", help="write every header to FILE")
    q.add_argument("backing", metavar="BACKING")
    q.add_argument("file", metavar="FILE")
    q = hs.add_parser("import", help="put headers from FILE back on files that lost them")
    q.add_argument("backing", metavar="BACKING")
    q.add_argument("file", metavar="FILE")
    q.add_argument("--force", action="store_true", help="also replace headers that differ")
    p.set_defaults(func=cmd_headers)

    from .keycli import add_parser as add_key_parser

    add_key_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
