"""``kmsfs init``: make a directory a kmsfs store with its default CMK."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .embedded_hsm import create_token
from .keyregistry import DEFAULT_ALIAS, OWNER_FILESYSTEM, KeyRegistry, new_key_record
from .keystore import KeyStore
from .pkcs11uri import Pkcs11Uri
from .store import StoreConfig, StoreError, check_user_xattrs, is_store, new_store_id, save_config, store_dir, validate_block_size

log = logging.getLogger(__name__)


@dataclass
class InitResult:
    store_id: str
    key_id: str
    key_alias: str
    hsm_description: str


def init_store(backing: Path, state_dir: Path, uri: Pkcs11Uri | None, block_size: int | None) -> InitResult:
    """Create the store.  Refuses (StoreError) rather than overwrite anything."""
    size = validate_block_size(block_size)
    if uri is not None and uri.pin_value is not None:
        raise StoreError(
            "the PKCS#11 URI gives the PIN as pin-value; the URI is saved in the store, so give "
            "the PIN as pin-source=file:/path/to/pin-file instead (the PIN is never written to the store)"
        )
    if backing.exists() and not backing.is_dir():
        raise StoreError(f"{backing} exists and is not a directory")
    if is_store(backing):
        raise StoreError(f"{backing} is already a kmsfs store; refusing to overwrite it")
    if store_dir(backing).exists():
        raise StoreError(
            f"{store_dir(backing)} exists but holds no config: an interrupted init? "
            f"Remove it by hand if nothing in it is needed, then run init again."
        )
    if backing.exists() and any(backing.iterdir()):
        raise StoreError(
            f"{backing} is not empty; kmsfs init needs an empty directory (files already "
            f"there would not be encrypted). Copy them in through the mount instead."
        )
    backing.mkdir(parents=True, exist_ok=True)
    sdir = store_dir(backing)
    sdir.mkdir(mode=0o755)
    try:
        check_user_xattrs(sdir)
        store_id = new_store_id()
        env: dict[str, str] = {}
        embedded = uri is None
        if uri is None:
            uri, env = create_token(state_dir, store_id)
            hsm_description = f"SoftHSM2 token {uri.token} (embedded default, state in {state_dir})"
        else:
            hsm_description = f"PKCS#11 token {uri.token} (module {uri.module_path})"
        keystore = KeyStore(uri, env)
        try:
            record = new_key_record(DEFAULT_ALIAS, OWNER_FILESYSTEM, description="filesystem-managed default key")
            keystore.generate_key(record.key_uuid, 1)
        finally:
            keystore.close()
        registry = KeyRegistry(backing)

        def add_default(reg):  # type: ignore[no-untyped-def]
            reg.keys[record.KeyId] = record
            reg.default_key = record.KeyId

        registry.update(add_default)
        # The config is written last: a store without it is not a store.
        save_config(backing, StoreConfig(
            store_id=store_id, block_size=size, hsm_uri=str(uri), hsm_env=env, embedded_hsm=embedded,
        ))
    except BaseException:
        _remove_partial(sdir)
        raise
    log.info("initialised store %s in %s", store_id, backing)
    return InitResult(store_id, record.KeyId, record.Alias, hsm_description)


def _remove_partial(sdir: Path) -> None:
    for child in sdir.iterdir():
        child.unlink()
    os.rmdir(sdir)
