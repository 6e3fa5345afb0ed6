"""A stand-in for a cloud KMS, for the plug-in test. A test double, because no KMS can run
here: it keeps its key-encryption key in its own memory (here: derived from an environment
variable so that a second process finds the same key), and counts its calls."""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CALLS = {"wrap": 0, "unwrap": 0}


class FakeKms:
    def __init__(self) -> None:
        seed = os.environ.get("FAKE_KMS_SEED", "seed").encode()
        self._aead = AESGCM(hashlib.sha256(b"fake-kms|" + seed).digest())

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        CALLS["wrap"] += 1
        nonce = os.urandom(12)
        return b"KMS1" + nonce + self._aead.encrypt(nonce, key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        CALLS["unwrap"] += 1
        if not blob.startswith(b"KMS1"):
            raise ValueError("not wrapped by this KMS")
        return self._aead.decrypt(blob[4:16], blob[16:], aad)


def make() -> FakeKms:
    return FakeKms()
