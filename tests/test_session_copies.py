"""Session copies of CMK objects (kmsfs/keystore.py, KeyStore._capable).

SoftHSM2 re-reads a token object's file, under file locks, before every use;
the key store therefore wraps and unwraps with a copy of the key made in its
own session (C_CopyObject, CKA_TOKEN false), renewed every
SESSION_COPY_SECONDS.  Against a real SoftHSM2 token, this checks that:

* the copy is inside the HSM, sensitive and non-extractable, like the key;
  what it wraps the token object unwraps and the other way round;
* a change made to the key object in the HSM directly (not through this key
  store) reaches wraps and unwraps within SESSION_COPY_SECONDS;
* changes through this key store reach them at once: a disable through the
  helper, a destroy, and ``drop_session_copies`` (called when a CMK stops
  being Enabled);
* a module that refuses to copy keys is used through the token object, with
  one log line saying so.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import pytest

from test_crash_more import registry
from test_hsm_helper import keystore_of

pytestmark = pytest.mark.mount

AAD = b"associated data"


def default_key(store) -> uuid.UUID:
    return uuid.UUID(registry(store)["kmsfs-default"]["KeyId"])


def test_wraps_use_a_sensitive_non_extractable_session_copy_compatible_with_the_token_object(store):
    from pkcs11 import Attribute
    from pkcs11 import exceptions as p11exc

    key = default_key(store)
    dek = os.urandom(32)
    with keystore_of(store) as ks:
        nonce, wrapped = ks.wrap_dek(key, 1, dek, AAD)
        (copy, _expires), = ks._copies.values()
        assert copy[Attribute.TOKEN] is False
        assert copy[Attribute.SENSITIVE] is True and copy[Attribute.EXTRACTABLE] is False
        with pytest.raises(p11exc.AttributeSensitive):
            copy[Attribute.VALUE]
        assert ks.unwrap_dek(key, 1, nonce, wrapped, AAD) == dek
        # The token object, used directly, reads what the copy wrote and the other way round.
        ks._copies.clear()
        ks.session_copies = False
        assert ks.unwrap_dek(key, 1, nonce, wrapped, AAD) == dek
        nonce2, wrapped2 = ks.wrap_dek(key, 1, dek, AAD)
        assert not ks._copies
        ks.session_copies = True
        assert ks.unwrap_dek(key, 1, nonce2, wrapped2, AAD) == dek
        assert len(ks._copies) == 1


def test_a_change_made_in_the_hsm_directly_reaches_wraps_within_the_copy_lifetime(store):
    from kmsfs.keystore import SESSION_COPY_SECONDS, HsmKeyRefused

    key = default_key(store)
    dek = os.urandom(32)
    with keystore_of(store) as ks, keystore_of(store) as other:
        nonce, wrapped = ks.wrap_dek(key, 1, dek, AAD)
        assert other.set_usable_in_process(key, 1, False)  # another session turns the key off
        try:
            time.sleep(SESSION_COPY_SECONDS + 0.1)
            with pytest.raises(HsmKeyRefused):
                ks.wrap_dek(key, 1, dek, AAD)
            with pytest.raises(HsmKeyRefused):
                ks.unwrap_dek(key, 1, nonce, wrapped, AAD)
        finally:
            assert other.set_usable_in_process(key, 1, True)
        # Usable again at once: a refused key leaves no copy behind.
        assert ks.unwrap_dek(key, 1, nonce, wrapped, AAD) == dek


def test_drop_session_copies_makes_the_next_use_ask_the_token_object(store):
    from kmsfs.keystore import HsmKeyRefused

    key = default_key(store)
    dek = os.urandom(32)
    with keystore_of(store) as ks, keystore_of(store) as other:
        ks.wrap_dek(key, 1, dek, AAD)
        assert other.set_usable_in_process(key, 1, False)
        try:
            ks.drop_session_copies(key)
            assert not ks._copies
            with pytest.raises(HsmKeyRefused):
                ks.wrap_dek(key, 1, dek, AAD)
        finally:
            assert other.set_usable_in_process(key, 1, True)


def test_a_disable_through_the_helper_refuses_wraps_at_once(store):
    from kmsfs.keystore import HsmKeyRefused

    key = default_key(store)
    dek = os.urandom(32)
    with keystore_of(store) as ks:
        ks.wrap_dek(key, 1, dek, AAD)
        ks.set_usable(key, 1, False)
        try:
            with pytest.raises(HsmKeyRefused):
                ks.wrap_dek(key, 1, dek, AAD)
        finally:
            ks.set_usable(key, 1, True)
        ks.wrap_dek(key, 1, dek, AAD)


def test_a_destroyed_key_version_is_missing_at_once(store):
    from kmsfs.keystore import HsmKeyMissing

    key = uuid.uuid4()
    dek = os.urandom(32)
    with keystore_of(store) as ks:
        ks.generate_key(key, 1)
        nonce, wrapped = ks.wrap_dek(key, 1, dek, AAD)
        assert ks.unwrap_dek(key, 1, nonce, wrapped, AAD) == dek
        ks.destroy_key(key, 1)
        assert not ks._copies
        with pytest.raises(HsmKeyMissing):
            ks.unwrap_dek(key, 1, nonce, wrapped, AAD)
        with pytest.raises(HsmKeyMissing):
            ks.wrap_dek(key, 1, dek, AAD)


class _NoCopies:
    """A key handle whose module has no C_CopyObject."""

    def __init__(self, key: object) -> None:
        self._key = key

    def __getattr__(self, name: str) -> object:
        return getattr(self._key, name)

    def copy(self, attrs: object) -> object:
        from pkcs11 import exceptions as p11exc

        raise p11exc.FunctionNotSupported()


def test_a_module_that_will_not_copy_keys_is_used_through_the_token_object(store, caplog):
    from kmsfs.keystore import object_id

    key = default_key(store)
    dek = os.urandom(32)
    with keystore_of(store) as ks:
        ks._handles[object_id(key, 1)] = _NoCopies(ks._key(key, 1))
        with caplog.at_level(logging.INFO, logger="kmsfs.keystore"):
            for _ in range(3):
                nonce, wrapped = ks.wrap_dek(key, 1, dek, AAD)
                assert ks.unwrap_dek(key, 1, nonce, wrapped, AAD) == dek
        assert not ks._copies and ks.session_copies is False
        refusals = [r for r in caplog.records if "does not copy keys" in r.getMessage()]
        assert len(refusals) == 1, caplog.text


def test_a_token_that_went_away_fails_wraps_within_the_copy_lifetime_even_under_constant_use(store):
    from kmsfs.keystore import SESSION_COPY_SECONDS, HsmUnavailable

    key = default_key(store)
    dek = os.urandom(32)
    tokens = store.state_dir / "tokens"
    with keystore_of(store) as ks:
        ks.wrap_dek(key, 1, dek, AAD)
        os.rename(tokens, tokens.with_name("tokens.away"))
        gone = time.monotonic()
        try:
            # SoftHSM2 would go on serving the session copy from memory: every
            # SESSION_COPY_SECONDS the key store uses the token object once.
            failed_after = None
            while time.monotonic() - gone < SESSION_COPY_SECONDS + 1.0:
                try:
                    ks.wrap_dek(key, 1, dek, AAD)
                except HsmUnavailable:
                    failed_after = time.monotonic() - gone
                    break
            assert failed_after is not None and failed_after <= SESSION_COPY_SECONDS + 0.2, failed_after
            assert not ks._copies
        finally:
            os.rename(tokens.with_name("tokens.away"), tokens)
        nonce, wrapped = ks.wrap_dek(key, 1, dek, AAD)  # back: reconnected
        assert ks.unwrap_dek(key, 1, nonce, wrapped, AAD) == dek
