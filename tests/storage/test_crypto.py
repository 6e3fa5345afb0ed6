"""Field encryption, blind indexes and the key ring, with real cryptography and the real engine."""

from __future__ import annotations

import base64
import os
import stat
import uuid
from pathlib import Path

import pytest

from phiaudit.storage import (
    BlindIndex,
    ConfigError,
    FieldCipher,
    IntegrityError,
    KeyRing,
    RecordEncoder,
    Store,
    default_kek_path,
)


def test_clickhouse_decrypt_reads_our_layout(store: Store, encoder: RecordEncoder,
                                             data_dir: Path) -> None:
    eid = uuid.uuid4()
    blob = encoder.cipher.encrypt("patient_id", eid.bytes, "pat-ünï-42")
    key = KeyRing.open(data_dir).get(encoder.cipher.key_id).material
    _, rows = store.query(
        "SELECT decrypt('aes-256-gcm', substring(b, 34), unhex({k:String}), substring(b, 22, 12),"
        " concat('phiaudit:v1|patient_id|', substring(b, 6, 16))),"
        " tryDecrypt('aes-256-gcm', substring(b, 34), unhex({k:String}), substring(b, 22, 12),"
        " concat('phiaudit:v1|resource_id|', substring(b, 6, 16)))"
        " FROM (SELECT unhex({b:String}) AS b)",
        {"k": key.hex(), "b": blob.hex()}, binary=True)
    assert rows[0][0] == "pat-ünï-42".encode()
    assert rows[0][1] is None  # bound to its column: another column's AAD does not open it


def test_ciphertext_is_bound_to_event_and_column(tmp_path: Path) -> None:
    ring = KeyRing.open(tmp_path / "d")
    cipher = FieldCipher(ring)
    a, b = uuid.uuid4().bytes, uuid.uuid4().bytes
    blob = cipher.encrypt("patient_id", a, "p-1")
    assert cipher.decrypt("patient_id", blob, a) == b"p-1"
    assert b"p-1" not in blob
    with pytest.raises(IntegrityError):
        cipher.decrypt("resource_id", blob)
    with pytest.raises(IntegrityError):
        cipher.decrypt("patient_id", blob, b)
    forged = blob[:5] + b + blob[21:]  # re-labelled to another event
    with pytest.raises(IntegrityError):
        cipher.decrypt("patient_id", forged)
    flipped = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(IntegrityError):
        cipher.decrypt("patient_id", flipped)
    # random nonces: the same value never encrypts the same way twice
    assert cipher.encrypt("patient_id", a, "p-1") != blob


def test_blind_index_is_keyed_and_domain_separated(tmp_path: Path) -> None:
    idx1 = BlindIndex(KeyRing.open(tmp_path / "one"))
    os.environ.pop("PHIAUDIT_KEK", None)
    idx2 = BlindIndex(KeyRing.open(tmp_path / "two"))
    assert idx1("patient", "p-1") == idx1("patient", "p-1")
    assert idx1("patient", "p-1") != idx1("client", "p-1")
    assert idx1("patient", "p-1") != idx2("patient", "p-1")
    assert len(idx1("patient", "p-1")) == 32 and idx1("patient", "") == ""


def test_key_ring_kek_lives_outside_data_dir_and_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ring = KeyRing.open(data)
    kek = default_kek_path(data)
    assert data.resolve() not in kek.parents
    for path in (kek, data / "keys" / "keyring.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    material = ring.active("data").material
    assert material not in (data / "keys" / "keyring.json").read_bytes()
    assert base64.b64encode(material) not in (data / "keys" / "keyring.json").read_bytes()
    assert "[REDACTED]" in repr(ring) and "[REDACTED]" in repr(ring.active("data"))
    # rotation: new rows use the new key, old rows stay readable
    old = FieldCipher(ring)
    blob = old.encrypt("query", b"\x01" * 16, "q")
    new_id = ring.rotate("data")
    reopened = KeyRing.open(data)
    new = FieldCipher(reopened)
    assert new.key_id == new_id != old.key_id
    assert new.decrypt("query", blob) == b"q"


def test_wrong_or_bad_kek_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("PHIAUDIT_KEK", base64.b64encode(b"k" * 32).decode())
    KeyRing.open(data)
    monkeypatch.setenv("PHIAUDIT_KEK", base64.b64encode(b"x" * 32).decode())
    with pytest.raises(ConfigError, match="does not open"):
        KeyRing.open(data)
    monkeypatch.setenv("PHIAUDIT_KEK", "too-short")
    with pytest.raises(ConfigError, match="32 bytes"):
        KeyRing.open(data)
    monkeypatch.delenv("PHIAUDIT_KEK")
    inside = data / "kek"
    inside.write_text(base64.b64encode(b"k" * 32).decode())
    monkeypatch.setenv("PHIAUDIT_KEK_FILE", str(inside))
    with pytest.raises(ConfigError, match="inside the data directory"):
        KeyRing.open(data)


def test_kms_plug_in_wraps_the_key_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.storage import fake_kms

    monkeypatch.delenv("PHIAUDIT_KEK", raising=False)
    monkeypatch.setenv("PHIAUDIT_KMS", "tests.storage.fake_kms:make")
    data = tmp_path / "data"
    ring = KeyRing.open(data)
    assert fake_kms.CALLS["wrap"] >= 2
    assert not default_kek_path(data).exists()  # no local key-encryption key at all
    blob = FieldCipher(ring).encrypt("patient_id", b"\x02" * 16, "p-kms")
    again = KeyRing.open(data)
    assert fake_kms.CALLS["unwrap"] >= 2
    assert FieldCipher(again).decrypt("patient_id", blob) == b"p-kms"
    # another KMS key cannot open it, and says so in one line
    monkeypatch.setenv("FAKE_KMS_SEED", "another")
    with pytest.raises(ConfigError, match=r"could not open|does not open"):
        KeyRing.open(data)
    monkeypatch.setenv("PHIAUDIT_KMS", "tests.storage.no_such_module:make")
    with pytest.raises(ConfigError, match="cannot load the KMS plug-in"):
        KeyRing.open(data)
