"""bff.keys: per-session secrets, store ids, AEAD sealing and the operator keyring's rotation."""

from __future__ import annotations

import base64

import pytest

from bff.keys import (
    DecryptError,
    Keyring,
    new_secret,
    open_sealed,
    public_handle,
    seal,
    secret_key,
    store_id,
)

KEY_A = "key-A-" + "a" * 40
KEY_B = "key-B-" + "b" * 40


def _bits_of(secret: str) -> int:
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    return 8 * len(raw)


def _flipped(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# -- secrets and ids ----------------------------------------------------------------------


def test_a_secret_carries_at_least_128_random_bits_and_never_repeats() -> None:
    secrets = [new_secret() for _ in range(2000)]
    assert all(_bits_of(s) >= 128 for s in secrets)
    assert len(set(secrets)) == len(secrets)
    # Cookie-safe alphabet: nothing that needs quoting in a Cookie header.
    assert all(s.replace("-", "").replace("_", "").isalnum() for s in secrets)


def test_store_id_is_stable_per_secret_and_distinct_across_secrets() -> None:
    a, b = new_secret(), new_secret()
    assert store_id(a) == store_id(a)
    assert store_id(a) != store_id(b)


def test_store_id_reveals_nothing_of_the_secret_and_differs_per_purpose() -> None:
    secret = new_secret()
    ids = {
        store_id(secret),
        store_id(secret, "tx"),
        store_id(secret, "other"),
        public_handle(secret),
    }
    assert len(ids) == 4
    for derived in ids:
        assert secret not in derived
        assert secret[:8] not in derived
    assert _bits_of(store_id(secret)) >= 128


def test_aead_keys_differ_per_secret_and_per_purpose() -> None:
    secret = new_secret()
    keys = {secret_key(secret), secret_key(secret, "tx"), secret_key(new_secret())}
    assert len(keys) == 3
    assert all(len(k) == 32 for k in keys)


# -- per-session AEAD ---------------------------------------------------------------------


def _sealed() -> tuple[bytes, bytes]:
    key = secret_key(new_secret())
    return key, seal(key, b'{"access_token":"x"}', b"aad")


def test_a_sealed_blob_opens_with_its_key_and_aad() -> None:
    key, blob = _sealed()
    assert open_sealed(key, blob, b"aad") == b'{"access_token":"x"}'
    assert b"access_token" not in blob


def test_sealing_twice_gives_different_blobs() -> None:
    key = secret_key(new_secret())
    assert seal(key, b"same", b"aad") != seal(key, b"same", b"aad")


def test_flipping_any_bit_of_a_sealed_blob_raises_decrypt_error() -> None:
    key, blob = _sealed()
    for bit in range(8 * len(blob)):
        with pytest.raises(DecryptError):
            open_sealed(key, _flipped(blob, bit), b"aad")


def test_a_truncated_or_extended_blob_raises_decrypt_error() -> None:
    key, blob = _sealed()
    for length in range(len(blob)):
        with pytest.raises(DecryptError):
            open_sealed(key, blob[:length], b"aad")
    with pytest.raises(DecryptError):
        open_sealed(key, blob + b"\x00", b"aad")


def test_a_blob_opened_with_another_aad_or_key_raises_decrypt_error() -> None:
    key, blob = _sealed()
    with pytest.raises(DecryptError):
        open_sealed(key, blob, b"other aad")
    with pytest.raises(DecryptError):
        open_sealed(secret_key(new_secret()), blob, b"aad")


# -- the operator keyring: signing and server-side AEAD with rotation ---------------------


def test_keyring_needs_at_least_one_key() -> None:
    with pytest.raises(ValueError):
        Keyring([])


def test_a_signed_value_round_trips() -> None:
    ring = Keyring([KEY_A])
    assert ring.unsign(ring.sign("hello")) == "hello"


@pytest.mark.parametrize(
    "forged",
    [
        "",
        "hello",
        "hello.",
        ".sig",
        "hello.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "héllo.x",
        "\x00\x01",
    ],
)
def test_garbage_never_unsigns(forged: str) -> None:
    assert Keyring([KEY_A]).unsign(forged) is None


def test_a_tampered_signature_or_value_does_not_unsign() -> None:
    ring = Keyring([KEY_A])
    signed = ring.sign("session-secret")
    for i in range(len(signed)):
        changed = signed[:i] + ("A" if signed[i] != "A" else "B") + signed[i + 1 :]
        assert ring.unsign(changed) is None, f"changed position {i} still verified"
    assert ring.unsign(signed[:-1]) is None


def test_signed_under_a_verifies_under_b_a_but_not_under_b() -> None:
    signed = Keyring([KEY_A]).sign("v")
    assert Keyring([KEY_B, KEY_A]).unsign(signed) == "v"
    assert Keyring([KEY_B]).unsign(signed) is None


def test_the_first_key_signs_after_rotation() -> None:
    signed = Keyring([KEY_B, KEY_A]).sign("v")
    assert Keyring([KEY_B]).unsign(signed) == "v"
    assert Keyring([KEY_A]).unsign(signed) is None


def test_encrypted_under_a_decrypts_under_b_a_but_not_under_b() -> None:
    blob = Keyring([KEY_A]).encrypt(b"client token", b"aad")
    assert Keyring([KEY_B, KEY_A]).decrypt(blob, b"aad") == b"client token"
    with pytest.raises(DecryptError):
        Keyring([KEY_B]).decrypt(blob, b"aad")


def test_the_first_key_encrypts_after_rotation() -> None:
    blob = Keyring([KEY_B, KEY_A]).encrypt(b"x", b"aad")
    assert Keyring([KEY_B]).decrypt(blob, b"aad") == b"x"
    with pytest.raises(DecryptError):
        Keyring([KEY_A]).decrypt(blob, b"aad")


def test_keyring_blob_tampering_truncation_and_wrong_aad_raise_decrypt_error() -> None:
    ring = Keyring([KEY_B, KEY_A])
    blob = ring.encrypt(b"client token", b"aad")
    assert b"client token" not in blob
    for bit in range(8 * len(blob)):
        with pytest.raises(DecryptError):
            ring.decrypt(_flipped(blob, bit), b"aad")
    for length in range(len(blob)):
        with pytest.raises(DecryptError):
            ring.decrypt(blob[:length], b"aad")
    with pytest.raises(DecryptError):
        ring.decrypt(blob, b"other aad")
