"""The embedded default HSM: a SoftHSM2 token of kmsfs's own.

State directory layout (default ``$XDG_DATA_HOME/kmsfs``, else
``~/.local/share/kmsfs``)::

    softhsm2.conf            points SoftHSM2 at tokens/
    tokens/                  SoftHSM2's token files (keys are encrypted by SoftHSM2 under the PIN)
    pins/STORE_ID.pin        the user PIN, random, mode 0600
    pins/STORE_ID.so-pin     the security officer PIN, random, mode 0600

One token per store, labelled ``kmsfs-`` plus the first 16 hex digits of the
store id.  The store's config records a PKCS#11 URI pointing here, so that
mounting needs no options.  The PINs are never written into the backing store.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from .pkcs11uri import Pkcs11Uri

log = logging.getLogger(__name__)

SOFTHSM2_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
)


class EmbeddedHsmError(Exception):
    pass


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "kmsfs"


def find_softhsm2_module() -> str:
    override = os.environ.get("KMSFS_SOFTHSM2_MODULE")
    for candidate in ((override,) if override else ()) + SOFTHSM2_MODULE_CANDIDATES:
        if candidate and os.path.exists(candidate):
            return candidate
    raise EmbeddedHsmError(
        "SoftHSM2 is not installed (no libsofthsm2.so found). Install it with "
        "'apt-get install softhsm2', or give an HSM with --pkcs11 URI."
    )


def _softhsm2_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise EmbeddedHsmError("softhsm2-util is not installed; install it with 'apt-get install softhsm2'")
    return util


def prepare_state_dir(state_dir: Path) -> Path:
    """Create the state directory and its SoftHSM2 config; returns the config path."""
    state_dir = state_dir.resolve()
    (state_dir / "tokens").mkdir(parents=True, exist_ok=True, mode=0o700)
    (state_dir / "pins").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    conf = state_dir / "softhsm2.conf"
    text = (
        "# SoftHSM2 configuration of the kmsfs embedded HSM; written by kmsfs.\n"
        f"directories.tokendir = {state_dir / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return conf


def token_label(store_id: str) -> str:
    return f"kmsfs-{store_id[:16]}"


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def create_token(state_dir: Path, store_id: str) -> tuple[Pkcs11Uri, dict[str, str]]:
    """Initialise a fresh SoftHSM2 token for one store; returns its URI and environment."""
    module = find_softhsm2_module()
    util = _softhsm2_util()
    conf = prepare_state_dir(state_dir)
    state_dir = conf.parent
    pin_path = state_dir / "pins" / f"{store_id}.pin"
    so_pin_path = state_dir / "pins" / f"{store_id}.so-pin"
    pin = secrets.token_urlsafe(24)
    so_pin = secrets.token_urlsafe(24)
    _write_secret(pin_path, pin)
    _write_secret(so_pin_path, so_pin)
    env = {"SOFTHSM2_CONF": str(conf)}
    label = token_label(store_id)
    # softhsm2-util only takes PINs as arguments; the window in which they are
    # visible in the process list is the token's creation, before any key exists.
    result = subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
        env={**os.environ, **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    if result.returncode != 0:
        pin_path.unlink(missing_ok=True)
        so_pin_path.unlink(missing_ok=True)
        raise EmbeddedHsmError(
            f"softhsm2-util could not create token {label}: {result.stderr.strip() or result.stdout.strip()}"
        )
    log.info("created SoftHSM2 token %s in %s", label, state_dir)
    uri = Pkcs11Uri(token=label, module_path=module, pin_source=f"file:{pin_path}")
    return uri, env
