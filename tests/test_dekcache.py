"""The DEK cache (kmsfs/dekcache.py) and the envelope's use of it.

The envelope tests use a key store in software that counts its calls, so they
need neither FUSE nor SoftHSM2; tests/test_perf_paths.py checks the same
through a real mount and the embedded HSM.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.contentcrypt import ContentCipher
from kmsfs.dekcache import DekCache
from kmsfs.envelope import Envelope, KeyUnusable
from kmsfs.format import Header, parse_header
from kmsfs.keyregistry import DISABLED, ENABLED, REVALIDATE_SECONDS, KeyNotFound, KeyRegistry, new_key_record
from kmsfs.keystore import HsmUnwrapFailed
from kmsfs.store import store_dir

B = 4068


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dek() -> bytes:
    return os.urandom(32)


# ---------------------------------------------------------------------- the cache alone

def test_hit_and_miss_are_counted():
    cache = DekCache(4, 60)
    c = dek()
    assert cache.get(b"h1") is None
    cache.put(b"h1", b"k" * 16, c)
    assert cache.get(b"h1") is c
    assert cache.get(b"h2") is None
    assert cache.stats() == {"entries": 1, "hits": 1, "misses": 2}


def test_an_entry_expires_max_age_after_it_was_put_however_often_used():
    clock = FakeClock()
    cache = DekCache(4, 60, clock)
    c = dek()
    cache.put(b"h", b"k" * 16, c)
    for _ in range(5):
        clock.now += 11  # used every 11 s: still gone at 60 s after the put
        expected = c if clock.now < 1060 else None
        assert cache.get(b"h") is expected
    clock.now = 1059.9
    cache.put(b"h2", b"k" * 16, c)
    clock.now = 1060
    assert cache.get(b"h") is None and len(cache) == 1  # the expired entry is gone, not kept


def test_put_again_restarts_the_age():
    clock = FakeClock()
    cache = DekCache(4, 60, clock)
    c = dek()
    cache.put(b"h", b"k" * 16, c)
    clock.now += 50
    cache.put(b"h", b"k" * 16, c)
    clock.now += 50
    assert cache.get(b"h") is c


def test_least_recently_used_goes_first_beyond_capacity():
    cache = DekCache(3, 60)
    deks = {name: dek() for name in (b"a", b"b", b"c", b"d")}
    for name in (b"a", b"b", b"c"):
        cache.put(name, b"k" * 16, deks[name])
    assert cache.get(b"a") is deks[b"a"]  # a is now the most recent
    cache.put(b"d", b"k" * 16, deks[b"d"])
    assert len(cache) == 3
    assert cache.get(b"b") is None  # the least recently used
    assert [cache.get(n) is deks[n] for n in (b"a", b"c", b"d")] == [True, True, True]


def test_forget_key_drops_that_keys_entries_only():
    cache = DekCache(10, 60)
    mine, other = b"m" * 16, b"o" * 16
    for i in range(4):
        cache.put(b"mine%d" % i, mine, dek())
    kept = dek()
    cache.put(b"other", other, kept)
    assert cache.forget_key(mine) == 4
    assert cache.forget_key(mine) == 0
    assert len(cache) == 1 and cache.get(b"other") is kept


@pytest.mark.parametrize("capacity, max_age", [(0, 60), (-1, 60), (10, 0), (10, -5)])
def test_a_cache_needs_room_and_time(capacity, max_age):
    with pytest.raises(ValueError):
        DekCache(capacity, max_age)


def test_threads_share_one_cache_without_losing_entries():
    cache = DekCache(100_000, 600)
    key = b"k" * 16
    c = dek()

    def worker(n: int) -> None:
        for i in range(2000):
            cache.put(b"%d-%d" % (n, i), key, c)
            assert cache.get(b"%d-%d" % (n, i)) is c

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 8000 and cache.stats()["hits"] == 8000
    assert cache.forget_key(key) == 8000


# ---------------------------------------------------------------------- the envelope with a cache

class SoftwareKeyStore:
    """wrap_dek/unwrap_dek as kmsfs.keystore.KeyStore does them, in software, counted."""

    def __init__(self) -> None:
        self.keys: dict[tuple[uuid.UUID, int], bytes] = {}
        self.calls = {"encrypt": 0, "decrypt": 0}

    def wrap_dek(self, key_id: uuid.UUID, version: int, dek: bytes, aad: bytes) -> tuple[bytes, bytes]:
        self.calls["encrypt"] += 1
        nonce = os.urandom(12)
        return nonce, AESGCM(self.keys[key_id, version]).encrypt(nonce, dek, aad)

    def unwrap_dek(self, key_id: uuid.UUID, version: int, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        self.calls["decrypt"] += 1
        try:
            return AESGCM(self.keys[key_id, version]).decrypt(nonce, wrapped, aad)
        except InvalidTag:
            raise HsmUnwrapFailed("could not unwrap") from None


@pytest.fixture
def envelope(tmp_path: Path):
    store_dir(tmp_path).mkdir()
    registry = KeyRegistry(tmp_path)
    keystore = SoftwareKeyStore()
    records = {}
    for alias in ("one", "two"):
        record = new_key_record(alias, "0")
        keystore.keys[record.key_uuid, 1] = os.urandom(32)
        records[alias] = record

    def add(reg):
        for record in records.values():
            reg.keys[record.KeyId] = record
        reg.default_key = records["one"].KeyId

    registry.update(add)
    env = Envelope(keystore, registry, B)
    env.dek_cache = DekCache(100, 300)
    return env, keystore, registry, records


def _set_state(registry: KeyRegistry, key_id: str, state: str) -> None:
    def change(reg):
        reg.keys[key_id].KeyState = state

    registry.update(change)


def _roundtrip(a: ContentCipher, b: ContentCipher) -> None:
    assert bytes(b.decrypt(a.encrypt(b"plain" * 100, 7), 7)) == b"plain" * 100


def test_a_created_file_opens_without_an_hsm_call(envelope):
    env, keystore, registry, records = envelope
    header, created = env.seal_new(records["one"], b"")
    assert keystore.calls == {"encrypt": 1, "decrypt": 0}
    opened = env.open(parse_header(header.to_bytes()))
    assert keystore.calls["decrypt"] == 0
    _roundtrip(created, opened)


def test_a_first_open_unwraps_once_then_hits(envelope):
    env, keystore, registry, records = envelope
    header, created = env.seal_new(records["one"], b"")
    env.dek_cache = DekCache(100, 300)  # empty, as after a remount
    for _ in range(3):
        _roundtrip(created, env.open(parse_header(header.to_bytes())))
    assert keystore.calls["decrypt"] == 1
    assert env.dek_cache.stats()["hits"] == 2


def test_without_a_cache_every_open_unwraps(envelope):
    env, keystore, registry, records = envelope
    env.dek_cache = None
    header, created = env.seal_new(records["one"], b"")
    for _ in range(3):
        _roundtrip(created, env.open(parse_header(header.to_bytes())))
    assert keystore.calls["decrypt"] == 3


def _altered(header: Header, **fields) -> Header:
    values = dict(block_size=header.block_size, file_id=header.file_id, key_id=header.key_id,
                  key_version=header.key_version, context=header.context, wrap_nonce=header.wrap_nonce,
                  wrapped_dek=header.wrapped_dek, version=header.version)
    values.update(fields)
    return Header(**values)


def _flip(data: bytes, i: int = 0) -> bytes:
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


@pytest.mark.parametrize("field", ["file_id", "context", "wrap_nonce", "wrapped_dek", "key_id"])
def test_a_header_altered_in_any_field_misses_and_the_hsm_refuses_it(envelope, field):
    """A cached DEK is found only by the exact header it came from."""
    env, keystore, registry, records = envelope
    header, _ = env.seal_new(records["one"], b'{"a":"b"}')
    if field == "context":
        bad = _altered(header, context=b'{"a":"c"}')
    elif field == "key_id":
        # another existing key, so that the lookup reaches the cache and the HSM
        bad = _altered(header, key_id=records["two"].key_uuid.bytes)
    else:
        bad = _altered(header, **{field: _flip(getattr(header, field))})
    with pytest.raises(HsmUnwrapFailed):
        env.open(bad)
    assert keystore.calls["decrypt"] == 1  # it went to the HSM
    assert env.dek_cache.stats()["hits"] == 0
    assert len(env.dek_cache) == 1  # and nothing was cached for it


def test_a_disabled_key_refuses_a_cached_dek_and_forget_key_drops_it(envelope):
    env, keystore, registry, records = envelope
    one, two = records["one"], records["two"]
    h1, _ = env.seal_new(one, b"")
    h2, _ = env.seal_new(two, b"")
    _set_state(registry, one.KeyId, DISABLED)
    with pytest.raises(KeyUnusable):
        env.open(parse_header(h1.to_bytes()))  # cached, and still refused
    env.forget_key(one.key_uuid.bytes)
    assert len(env.dek_cache) == 1  # two's entry stays
    _set_state(registry, one.KeyId, ENABLED)
    env.open(parse_header(h1.to_bytes()))
    env.open(parse_header(h2.to_bytes()))
    assert keystore.calls["decrypt"] == 1  # one's DEK had to come from the HSM again, two's did not


def test_another_mounts_disable_counts_within_revalidate_seconds_and_its_enable_at_once(envelope, tmp_path):
    # Opens read keys.json as it was at most REVALIDATE_SECONDS ago (no stat
    # per open); only a key that is Enabled there is taken without a look.
    env, keystore, registry, records = envelope
    one = records["one"]
    header, _ = env.seal_new(one, b"")
    other_mount = KeyRegistry(tmp_path)
    _set_state(other_mount, one.KeyId, DISABLED)
    time.sleep(REVALIDATE_SECONDS + 0.05)
    with pytest.raises(KeyUnusable):
        env.open(parse_header(header.to_bytes()))
    _set_state(other_mount, one.KeyId, ENABLED)
    env.open(parse_header(header.to_bytes()))  # at once: a refusal is always checked afresh
    assert keystore.calls["decrypt"] == 0  # the open came from the DEK cache, no HSM call


def test_record_for_use_never_refuses_on_a_stale_view(envelope, tmp_path):
    env, keystore, registry, records = envelope
    one = records["one"]
    assert registry.record_for_use(one.KeyId).KeyState == ENABLED  # the view is now fresh
    other_mount = KeyRegistry(tmp_path)
    new = new_key_record("new", "0")
    other_mount.update(lambda reg: reg.keys.__setitem__(new.KeyId, new))
    assert registry.record_for_use(new.KeyId).Alias == "new"  # missing in the view: looked up at once
    _set_state(other_mount, one.KeyId, DISABLED)
    time.sleep(REVALIDATE_SECONDS + 0.05)
    assert registry.record_for_use(one.KeyId).KeyState == DISABLED
    _set_state(other_mount, one.KeyId, ENABLED)
    assert registry.record_for_use(one.KeyId).KeyState == ENABLED  # not Enabled in the view: looked up at once
    assert registry.record_for_use(str(uuid.uuid4())) is None


def test_rewrap_asks_the_hsm_and_the_new_header_opens(envelope):
    env, keystore, registry, records = envelope
    header, created = env.seal_new(records["one"], b"")
    moved = env.rewrap(header, records["two"])
    assert keystore.calls == {"encrypt": 2, "decrypt": 1}  # the old wrap is checked by the HSM
    _roundtrip(created, env.open(moved))
    assert keystore.calls["decrypt"] == 2


# ---------------------------------------------------------------------- open_cached: the daemon's open of a stored header

def test_open_cached_gives_the_parsed_header_and_cipher_without_a_parse_or_an_hsm_call(envelope):
    env, keystore, registry, records = envelope
    header, created = env.seal_new(records["one"], b'{"a":"b"}')
    raw = header.to_bytes()
    opened = env.open_cached(raw)
    assert opened is not None
    cached_header, cipher = opened
    assert cached_header == parse_header(raw) and cipher is created  # the very cipher: no new key schedule
    _roundtrip(created, cipher)
    assert keystore.calls["decrypt"] == 0
    assert env.dek_cache.stats()["hits"] == 1


def test_open_cached_misses_once_and_open_after_it_unwraps_once(envelope):
    """The daemon's miss path: open_cached, then open(look_in_cache=False); the
    miss is counted once, and the next open_cached hits."""
    env, keystore, registry, records = envelope
    header, created = env.seal_new(records["one"], b"")
    env.dek_cache = DekCache(100, 300)  # empty, as after a remount
    raw = header.to_bytes()
    assert env.open_cached(raw) is None
    _roundtrip(created, env.open(parse_header(raw), look_in_cache=False))
    assert keystore.calls["decrypt"] == 1
    assert env.dek_cache.stats() == {"entries": 1, "hits": 0, "misses": 1}
    again = env.open_cached(raw)
    assert again is not None and keystore.calls["decrypt"] == 1
    _roundtrip(created, again[1])


def test_open_cached_refuses_a_disabled_or_deleted_key(envelope):
    env, keystore, registry, records = envelope
    one = records["one"]
    header, _ = env.seal_new(one, b"")
    raw = header.to_bytes()
    _set_state(registry, one.KeyId, DISABLED)
    with pytest.raises(KeyUnusable):
        env.open_cached(raw)
    _set_state(registry, one.KeyId, ENABLED)
    assert env.open_cached(raw) is not None
    registry.update(lambda reg: reg.keys.pop(one.KeyId))
    with pytest.raises(KeyNotFound):
        env.open_cached(raw)


@pytest.mark.parametrize("position", [0, 4, 8, 20, 40, 60, -30, -1])
def test_open_cached_misses_a_header_that_differs_in_any_byte(envelope, position):
    env, keystore, registry, records = envelope
    header, _ = env.seal_new(records["one"], b"")
    raw = header.to_bytes()
    assert env.open_cached(_flip(raw, position % len(raw))) is None
    assert env.open_cached(raw[:-1]) is None and env.open_cached(raw + b"\0") is None
    assert keystore.calls["decrypt"] == 0


def test_open_cached_without_a_cache_always_misses(envelope):
    env, keystore, registry, records = envelope
    env.dek_cache = None
    header, _ = env.seal_new(records["one"], b"")
    assert env.open_cached(header.to_bytes()) is None
