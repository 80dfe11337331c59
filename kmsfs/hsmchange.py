"""Key attribute changes in a detached helper process, so a kill of kmsfs cannot interrupt them.

Why this exists: a PKCS#11 module need not store an attribute change
atomically.  SoftHSM2's file backend (2.6) rewrites the object's file in
place for every C_SetAttributeValue: it truncates the file, then writes it
again.  A SIGKILL of the calling process between the two leaves an empty
object file, and that CMK version, with every file wrapped under it, is
gone.  Only the process that makes the call can be interrupted that way.

So kmsfs never changes a key object's attributes in the daemon (or in
``kmsfs key --store``).  It starts ``python -m kmsfs.hsmchange`` as a process
of its own, in a new session and ignoring SIGINT, SIGTERM and SIGHUP, hands
it the job on its stdin and waits for its answer on stdout.  If the daemon is
killed while the helper runs, the helper still runs to its end.

One job is a whole key state change: every version's CKA_ENCRYPT and
CKA_DECRYPT and, optionally, the new keys.json.  The helper writes keys.json
itself, after the HSM, so that a kill of the daemon can never leave the two
out of step.  The daemon holds keys.lock (an exclusive flock) for the whole
registry update and passes that descriptor on to the helper: the lock lives
as long as either process keeps it open, so it stays held until the helper
is done even when the daemon is gone, and mount, fsck, ``kmsfs key`` and
every later key change wait for it (keyregistry.key_changes_settled).

The job (JSON on stdin; only the stdin pipe ever carries the PIN, inside
the URI's pin-value, and normally only the URI's pin-source file name):

    {"uri": "pkcs11:token=...?module-path=...&pin-source=file:...",
     "env": {"SOFTHSM2_CONF": "..."},
     "changes": [{"key_id": "<uuid>", "version": 1, "usable": false}, ...],
     "registry": {"path": ".../keys.json", "data": "<text>", "lock_fd": 3} or null}

The helper reads stdin to its end before it changes anything: a job cut
short (the daemon died while sending it) changes nothing.  It answers with
one JSON line on stdout, {"ok": true, "missing": [[key_id, version], ...],
"written": N} or {"ok": false, "error": "HsmKeyMissing", "message": "..."},
and exits 0 or 1.  Versions that are not on the token are skipped and
reported (they can be used by nobody either way).  If any other change
fails, the changes already made are undone and keys.json is left alone.

Works with any PKCS#11 module: the helper uses the module, token, PIN source
and allowed environment of the store's configuration, through the same
KeyStore code as the daemon.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: How long the caller waits for the helper before it reports the HSM unavailable.
#: The helper is not killed then (that is what this module avoids): it keeps
#: the keys.lock until it is done, and later key changes wait for it.
HELPER_TIMEOUT = 120.0
#: Tests only: seconds the helper sleeps after its HSM changes, before keys.json,
#: so that a test can kill the daemon while a change is surely in flight.
TEST_DELAY_ENV = "KMSFS_TEST_HSM_HELPER_DELAY"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_JOB = 2

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class UsableChange:
    """Turn one CMK version's CKA_ENCRYPT and CKA_DECRYPT on (usable) or off."""

    key_id: uuid.UUID
    version: int
    usable: bool


@dataclass(frozen=True)
class RegistryWrite:
    """keys.json to replace once the HSM changes are made, under the lock held by ``lock_fd``."""

    path: Path
    data: bytes
    lock_fd: int


# ====================================================================== the caller's side


def run_helper(uri_text: str, env: dict[str, str], changes: Sequence[UsableChange],
               registry: RegistryWrite | None = None, timeout: float = HELPER_TIMEOUT) -> list[UsableChange]:
    """Make ``changes`` (and then write ``registry``) in a detached helper; wait for it.

    Returns the changes whose key version is not on the token.  Raises an
    HsmError subclass as the in-process call would: HsmKeyMissing,
    HsmPinIncorrect (EACCES), HsmUnavailable, or HsmError.
    """
    from .keystore import HsmError, HsmUnavailable

    job: dict[str, Any] = {
        "uri": uri_text,
        "env": dict(env),
        "changes": [{"key_id": str(c.key_id), "version": c.version, "usable": c.usable} for c in changes],
        "registry": None,
    }
    pass_fds: tuple[int, ...] = ()
    if registry is not None:
        job["registry"] = {"path": str(registry.path), "data": registry.data.decode("utf-8"),
                           "lock_fd": registry.lock_fd}
        pass_fds = (registry.lock_fd,)
    child_env = dict(os.environ)
    # The helper must run this very kmsfs, wherever it was imported from.
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, child_env.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            # -P: not the working directory on sys.path; cwd "/": pin no directory (a mountpoint, say).
            [sys.executable, "-P", "-m", "kmsfs.hsmchange"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # A session of its own: no signal sent to the daemon's process group or terminal reaches it.
            start_new_session=True, close_fds=True, pass_fds=pass_fds, cwd="/", env=child_env,
        )
    except OSError as exc:
        raise HsmError(f"cannot start the HSM helper ({sys.executable} -m kmsfs.hsmchange): "
                       f"{os.strerror(exc.errno or 0)}") from exc
    log.debug("HSM helper pid %d started for %d attribute change(s)%s", proc.pid, len(changes),
              " and keys.json" if registry else "")
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        # Never kill it: a helper killed in the middle of an attribute change
        # is exactly the loss this module prevents.  It keeps keys.lock until
        # it ends; the change it makes may still complete.
        raise HsmUnavailable(
            f"the HSM helper (pid {proc.pid}) has not finished after {timeout:.0f}s; it keeps running, "
            f"and the key change may still complete: read the key's state again later") from None
    elapsed = time.monotonic() - started
    answer = _parse_answer(out)
    if answer is None:
        detail = err.decode(errors="replace").strip().splitlines()
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with status {proc.returncode}")
        raise HsmError(f"the HSM helper (pid {proc.pid}) {how} without an answer"
                       + (f": {detail[-1]}" if detail else ""))
    if not answer.get("ok"):
        raise _error_from(answer)
    log.debug("HSM helper pid %d done in %.3fs: %s attribute write(s)", proc.pid, elapsed, answer.get("written"))
    by_version = {(str(c.key_id), c.version): c for c in changes}
    return [by_version[(k, v)] for k, v in answer.get("missing", []) if (k, v) in by_version]


def _parse_answer(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.decode(errors="replace").splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "ok" in value:
            return value
    return None


def _error_from(answer: dict[str, Any]) -> Exception:
    """The helper's error as the HsmError the caller would have got from an in-process call."""
    from . import keystore

    name = str(answer.get("error", ""))
    message = str(answer.get("message", "the HSM helper failed"))
    if name in ("HsmModuleError", "HsmTokenNotFound", "HsmUnavailable"):
        # The daemon reached this token before; the helper could not: it is unavailable now.
        if name == "HsmUnavailable":
            return keystore.HsmUnavailable(message)
        return keystore.HsmUnavailable(f"the HSM is unavailable: {message}")
    cls = getattr(keystore, name, None)
    if isinstance(cls, type) and issubclass(cls, keystore.HsmError):
        return cls(message)
    return keystore.HsmError(message)


# ====================================================================== the helper's side


def _answer(value: dict[str, Any]) -> None:
    """Write the answer; a caller that died no longer reads it, which changes nothing."""
    try:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()
    except OSError:
        pass


def _parse_job(raw: bytes) -> tuple[str, dict[str, str], list[UsableChange], RegistryWrite | None]:
    job = json.loads(raw.decode("utf-8"))
    if not isinstance(job, dict):
        raise ValueError("the job is not a JSON object")
    changes = [UsableChange(uuid.UUID(c["key_id"]), int(c["version"]), bool(c["usable"]))
               for c in job["changes"]]
    registry = None
    if job.get("registry"):
        r = job["registry"]
        registry = RegistryWrite(Path(r["path"]), r["data"].encode("utf-8"), int(r["lock_fd"]))
        os.fstat(registry.lock_fd)  # the lock really came with the job (else OSError)
    env = {str(k): str(v) for k, v in (job.get("env") or {}).items()}
    return str(job["uri"]), env, changes, registry


def helper_main() -> int:
    # Once started it must finish: terminal and service-stop signals are ignored
    # (it takes a fraction of a second; only SIGKILL can stop it).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="kmsfs.hsmchange[%(process)d] %(levelname)s %(message)s")
    raw = sys.stdin.buffer.read()  # to its end: a job cut short changes nothing
    try:
        uri_text, env, changes, registry = _parse_job(raw)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        _answer({"ok": False, "error": "HsmError",
                 "message": f"the HSM helper got an incomplete or bad job, and changed nothing: {exc}"})
        return EXIT_BAD_JOB

    from .keystore import HsmError, HsmKeyMissing, KeyStore
    from .pkcs11uri import Pkcs11Uri, UriError
    from .store import atomic_write

    try:
        keystore = KeyStore(Pkcs11Uri.parse(uri_text), env)
    except (HsmError, UriError) as exc:
        _answer({"ok": False, "error": type(exc).__name__ if isinstance(exc, HsmError) else "HsmError",
                 "message": str(exc)})
        return EXIT_FAILED
    missing: list[list[object]] = []
    done: list[UsableChange] = []
    written = 0
    try:
        for change in changes:
            try:
                if keystore.set_usable_in_process(change.key_id, change.version, change.usable):
                    done.append(change)
                    written += 1
            except HsmKeyMissing:
                missing.append([str(change.key_id), change.version])
        delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        if registry is not None:
            atomic_write(registry.path, registry.data)
    except (HsmError, OSError) as exc:
        _undo(keystore, done)
        _answer({"ok": False, "error": type(exc).__name__ if isinstance(exc, HsmError) else "HsmError",
                 "message": str(exc) if isinstance(exc, HsmError)
                 else f"cannot write {registry.path if registry else 'keys.json'}: {exc}"})
        return EXIT_FAILED
    finally:
        keystore.close()
    _answer({"ok": True, "missing": missing, "written": written})
    return EXIT_OK


def _undo(keystore: Any, done: list[UsableChange]) -> None:
    """Put back what this job changed, so a failed change leaves the key as it was."""
    from .keystore import HsmError

    for change in reversed(done):
        try:
            keystore.set_usable_in_process(change.key_id, change.version, not change.usable)
        except HsmError as exc:
            log.error("could not undo the change of CMK %s v%d after a failure: %s",
                      change.key_id, change.version, exc)


if __name__ == "__main__":
    sys.exit(helper_main())
