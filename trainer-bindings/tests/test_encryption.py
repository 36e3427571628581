"""Encryption at rest from Python: ``Store(path, encryption_key=...)`` seals every checkpoint
(no plaintext of a known tensor anywhere in the store), loads it bit-exact with the key, and
raises EncryptionKeyError by name without it or with another; the key never shows in an error or
a message (docs/PYTHON.md, "Encryption")."""

import os

import numpy as np
import pytest

import ckptstore as cs

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
OTHER = bytes(range(1, 33))


def _files(d):
    for root, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                yield os.path.join(root, n), f.read()


def test_sealed_store_holds_no_plaintext_and_loads_bit_exact(store_dir):
    w = np.random.default_rng(7).standard_normal(50_000).astype(np.float32)
    with cs.Store(store_dir, encryption_key=KEY) as s:
        cs.save(s, {"w": w, "note": "hello"}, step=1)
    raw = w.tobytes()
    for path, data in _files(store_dir):
        for start in range(0, len(raw) - 32, 4099):
            assert raw[start:start + 32] not in data, (path, start)
    # The hex form of the same key opens it too.
    with cs.Store(store_dir, read_only=True, encryption_key=KEY_HEX) as s:
        back = cs.load(s, framework="numpy")
        # mmap=True: sealed bytes are never mapped; the tensors are decrypted copies.
        mapped = cs.load(s, framework="numpy", mmap=True)
    assert back["w"].tobytes() == raw and back["note"] == "hello"
    assert mapped["w"].tobytes() == raw


def test_missing_or_wrong_key_is_an_encryption_key_error_that_never_shows_the_key(store_dir):
    with cs.Store(store_dir, encryption_key=KEY) as s:
        cs.save(s, {"w": np.arange(1000, dtype=np.int64)}, step=1)
    with pytest.raises(cs.EncryptionKeyError, match="encrypted"):
        cs.Store(store_dir, read_only=True)
    with pytest.raises(cs.EncryptionKeyError, match="wrong key") as e:
        cs.Store(store_dir, read_only=True, encryption_key=OTHER)
    assert OTHER.hex() not in str(e.value) and KEY_HEX not in str(e.value)
    assert isinstance(e.value, cs.StoreError)
    with pytest.raises(ValueError, match="32 bytes") as e:
        cs.Store(store_dir, encryption_key=b"short-secret")
    assert "short-secret" not in str(e.value)
    # A second handle in this process with other options: the message redacts the keys.
    with cs.Store(store_dir, encryption_key=KEY):
        with pytest.raises(ValueError, match="redacted") as e:
            cs.Store(store_dir, encryption_key=KEY_HEX)
        assert KEY_HEX not in str(e.value) and repr(KEY) not in str(e.value)


def test_rotation_reads_old_checkpoints_with_old_encryption_keys(store_dir):
    a = np.arange(5000, dtype=np.int32)
    with cs.Store(store_dir, encryption_key=KEY) as s:
        cs.save(s, {"a": a}, step=1)
    with cs.Store(store_dir, encryption_key=OTHER, old_encryption_keys=[KEY]) as s:
        cs.save(s, {"a": a + 1}, step=2)
        assert (cs.load(s, step=1, framework="numpy")["a"] == a).all()
        assert (cs.load(s, step=2, framework="numpy")["a"] == a + 1).all()
    with cs.Store(store_dir, read_only=True, encryption_key=OTHER) as s:
        with pytest.raises(cs.EncryptionKeyError, match="wrong key"):
            cs.load(s, step=1, framework="numpy")
    with cs.Store(store_dir, encryption_key=OTHER, old_encryption_keys=[KEY]) as s:
        assert s.rekey() == [1]
    with cs.Store(store_dir, read_only=True, encryption_key=OTHER) as s:
        assert (cs.load(s, step=1, framework="numpy")["a"] == a).all()


def test_verify_chain_reports_the_head_and_check_head_sees_a_rollback(store_dir):
    with cs.Store(store_dir, encryption_key=KEY) as s:
        for step in (1, 2):
            cs.save(s, {"a": np.arange(100) + step}, step=step)
        r = s.verify_chain()
        assert r["verified"] == [1, 2] and r["breaks"] == [] and r["unauthenticated"] == []
        head = r["head"]
        assert head[0] == 2 and len(head[1]) == 64
        s.check_head(*head)
        s.delete(2)  # a rollback done by hand
        with pytest.raises(cs.CorruptionError, match="rolled back"):
            s.check_head(*head)
