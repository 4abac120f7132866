"""AES-256-GCM sealing: round trips, tamper detection, context binding, nonce freshness."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.crypto import (
    FORMAT_VERSION,
    OwnerKey,
    Sealed,
    TamperedCiphertext,
    associated_data,
    open_sealed,
    seal,
)
from bridge.crypto.cipher import NONCE_SIZE, TAG_SIZE

CTX = {"service": "billing", "task_id": "task-0001", "field": "value"}


@pytest.fixture
def key() -> OwnerKey:
    return OwnerKey(owner="acme", key_id="k1", secret=os.urandom(32))


def test_round_trip(key: OwnerKey) -> None:
    sealed = seal(key, b"hello queue", **CTX)
    assert sealed.key_id == "k1"
    assert len(sealed.nonce) == NONCE_SIZE
    assert len(sealed.ciphertext) == len(b"hello queue") + TAG_SIZE
    assert open_sealed(key, sealed, **CTX) == b"hello queue"


def test_round_trip_empty_plaintext(key: OwnerKey) -> None:
    sealed = seal(key, b"", **CTX)
    assert len(sealed.ciphertext) == TAG_SIZE
    assert open_sealed(key, sealed, **CTX) == b""


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_single_bit_flip_is_detected(key: OwnerKey) -> None:
    plaintext = b"0123456789abcdef-payload"
    sealed = seal(key, plaintext, **CTX)
    variants: list[tuple[str, int, Sealed]] = []
    for bit in range(len(sealed.nonce) * 8):
        variants.append(("nonce", bit, dataclasses.replace(sealed, nonce=_flip(sealed.nonce, bit))))
    # ciphertext body and the 16-byte tag at its end
    for bit in range(len(sealed.ciphertext) * 8):
        variants.append(("ciphertext", bit, dataclasses.replace(sealed, ciphertext=_flip(sealed.ciphertext, bit))))
    assert len(variants) == (NONCE_SIZE + len(plaintext) + TAG_SIZE) * 8

    not_detected = []
    for part, bit, tampered in variants:
        try:
            open_sealed(key, tampered, **CTX)
        except TamperedCiphertext:
            continue
        not_detected.append((part, bit))
    assert not_detected == []
    assert open_sealed(key, sealed, **CTX) == plaintext  # the original is still fine


@pytest.mark.parametrize(
    "change",
    [
        {"service": "shipping"},
        {"task_id": "task-0002"},
        {"field": "result"},
        {"field": "token"},
        {"service": "billin", "task_id": "gtask-0001"},  # same concatenation, different split
    ],
)
def test_wrong_context_is_rejected(key: OwnerKey, change: dict[str, str]) -> None:
    sealed = seal(key, b"payload", **CTX)
    with pytest.raises(TamperedCiphertext):
        open_sealed(key, sealed, **{**CTX, **change})


def test_other_owner_with_same_secret_and_id_is_rejected(key: OwnerKey) -> None:
    # Only the owner in the AAD differs: proves the owner is bound into the ciphertext.
    sealed = seal(key, b"payload", **CTX)
    impostor = OwnerKey(owner="globex", key_id=key.key_id, secret=key.secret)
    with pytest.raises(TamperedCiphertext):
        open_sealed(impostor, sealed, **CTX)


def test_wrong_secret_same_id_is_rejected(key: OwnerKey) -> None:
    sealed = seal(key, b"payload", **CTX)
    other = OwnerKey(owner=key.owner, key_id=key.key_id, secret=os.urandom(32))
    with pytest.raises(TamperedCiphertext):
        open_sealed(other, sealed, **CTX)


def test_key_id_mismatch_is_rejected(key: OwnerKey) -> None:
    sealed = seal(key, b"payload", **CTX)
    with pytest.raises(TamperedCiphertext, match="k2"):
        open_sealed(key, dataclasses.replace(sealed, key_id="k2"), **CTX)
    # Same secret relabelled with another id: the key id is in the AAD too.
    relabelled = OwnerKey(owner=key.owner, key_id="k2", secret=key.secret)
    with pytest.raises(TamperedCiphertext):
        open_sealed(relabelled, dataclasses.replace(sealed, key_id="k2"), **CTX)


@pytest.mark.parametrize(
    ("nonce", "ciphertext"),
    [
        (b"", None),
        (b"\x00" * 16, None),
        (None, b""),
        (None, b"\x00" * (TAG_SIZE - 1)),
    ],
)
def test_malformed_sealed_is_rejected(key: OwnerKey, nonce: bytes | None, ciphertext: bytes | None) -> None:
    sealed = seal(key, b"payload", **CTX)
    malformed = Sealed(
        key_id=sealed.key_id,
        nonce=sealed.nonce if nonce is None else nonce,
        ciphertext=sealed.ciphertext if ciphertext is None else ciphertext,
    )
    with pytest.raises(TamperedCiphertext):
        open_sealed(key, malformed, **CTX)


def test_truncated_or_extended_ciphertext_is_rejected(key: OwnerKey) -> None:
    sealed = seal(key, b"payload", **CTX)
    for ct in (sealed.ciphertext[:-1], sealed.ciphertext + b"\x00", sealed.ciphertext[1:]):
        with pytest.raises(TamperedCiphertext):
            open_sealed(key, dataclasses.replace(sealed, ciphertext=ct), **CTX)


def test_nonces_differ_across_seals(key: OwnerKey) -> None:
    seals = [seal(key, b"same plaintext", **CTX) for _ in range(200)]
    assert len({s.nonce for s in seals}) == 200
    assert len({s.ciphertext for s in seals}) == 200


def test_ciphertext_contains_no_plaintext(key: OwnerKey) -> None:
    plaintext = b"card=4111111111111111;cvv=123;" * 8
    sealed = seal(key, plaintext, **CTX)
    window = 6
    windows = {plaintext[i : i + window] for i in range(len(plaintext) - window + 1)}
    blob = sealed.nonce + sealed.ciphertext
    leaked = [w for w in windows if w in blob]
    assert leaked == []


def test_associated_data_is_canonical_and_versioned() -> None:
    ad = associated_data(owner="acme", service="billing", task_id="t1", field="value", key_id="k1")
    assert ad == associated_data(owner="acme", service="billing", task_id="t1", field="value", key_id="k1")
    assert bytes([FORMAT_VERSION]) in ad[:8]
    assert ad.startswith(b"QBAD" + bytes([FORMAT_VERSION]))
    for part in (b"acme", b"billing", b"t1", b"value", b"k1"):
        assert len(part).to_bytes(4, "big") + part in ad


_text = st.text(max_size=12)


@settings(max_examples=300)
@given(a=st.tuples(_text, _text, _text, _text, _text), b=st.tuples(_text, _text, _text, _text, _text))
def test_associated_data_is_injective(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    names = ("owner", "service", "task_id", "field", "key_id")
    ad_a = associated_data(**dict(zip(names, a, strict=True)))
    ad_b = associated_data(**dict(zip(names, b, strict=True)))
    assert (ad_a == ad_b) == (a == b)


def test_associated_data_separates_fields_unambiguously() -> None:
    base = {"owner": "a", "service": "b", "task_id": "c", "field": "d", "key_id": "e"}
    shifted = {"owner": "ab", "service": "", "task_id": "c", "field": "d", "key_id": "e"}
    assert associated_data(**base) != associated_data(**shifted)


_fixed_key = OwnerKey(owner="prop", key_id="kp", secret=bytes(range(32)))


@settings(max_examples=200)
@given(
    plaintext=st.binary(max_size=4096),
    service=st.text(min_size=1, max_size=20),
    task_id=st.text(min_size=1, max_size=40),
    field=st.sampled_from(["value", "token", "result"]),
)
def test_round_trip_property(plaintext: bytes, service: str, task_id: str, field: str) -> None:
    sealed = seal(_fixed_key, plaintext, service=service, task_id=task_id, field=field)
    assert open_sealed(_fixed_key, sealed, service=service, task_id=task_id, field=field) == plaintext


def test_sealing_is_cheap(key: OwnerKey) -> None:
    # Runs on the event loop: must stay in the microsecond range (no KDF, cached AEAD objects).
    payload = os.urandom(1024)
    start = time.perf_counter()
    for i in range(2000):
        sealed = seal(key, payload, service="s", task_id=str(i), field="value")
        open_sealed(key, sealed, service="s", task_id=str(i), field="value")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"2000 seal+open of 1 KiB took {elapsed:.3f}s"


def test_owner_key_repr_hides_secret(key: OwnerKey) -> None:
    text = repr(key)
    assert "acme" in text
    assert "k1" in text
    assert "secret" not in text
    assert repr(key.secret) not in text
    assert key.secret.hex() not in text


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_owner_key_requires_32_byte_secret(size: int) -> None:
    with pytest.raises(ValueError, match=f"must be 32 bytes, got {size}"):
        OwnerKey(owner="acme", key_id="k1", secret=b"\x01" * size)


def test_bound_facts_must_match_to_open(key: OwnerKey) -> None:
    """Facts stored in clear beside a ciphertext (trace context, token presence) are bound to it."""
    ctx = {"service": "s", "task_id": "t", "field": "value"}
    sealed = seal(key, b"v", **ctx, bind=("token", "00-aa-bb-01"))
    assert open_sealed(key, sealed, **ctx, bind=("token", "00-aa-bb-01")) == b"v"
    for other in [("no-token", "00-aa-bb-01"), ("token", "00-cc-bb-01"), ("token",), ()]:
        with pytest.raises(TamperedCiphertext):
            open_sealed(key, sealed, **ctx, bind=other)
    unbound = seal(key, b"v", **ctx)  # as sealed before 1.1
    with pytest.raises(TamperedCiphertext):
        open_sealed(key, unbound, **ctx, bind=("no-token", ""))
    assert associated_data(owner="o", service="s", task_id="t", field="f", key_id="k", bind=("x",)) != (
        associated_data(owner="o", service="s", task_id="t", field="fx", key_id="k")
    )
