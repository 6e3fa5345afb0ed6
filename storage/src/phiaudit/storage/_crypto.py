"""Field encryption, blind indexes and the key ring.

Every PHI field is encrypted with AES-256-GCM before it leaves the process. A stored
ciphertext ("blob") is self-describing::

    offset  size  what
    0       1     format version (1)
    1       4     key id, big endian
    5       16    event id (UUID bytes) the field belongs to
    21      12    random nonce
    33      n+16  ciphertext followed by the 16-byte GCM tag

The additional authenticated data is ``b"phiaudit:v1|" + column + b"|" + event_id``, so a
ciphertext moved to another column or another event does not decrypt. The layout is the one
ClickHouse's own function reads, for an investigator holding the data key::

    decrypt('aes-256-gcm', substring(patient_id, 34), unhex('<key hex>'),
            substring(patient_id, 22, 12),
            concat('phiaudit:v1|patient_id|', substring(patient_id, 6, 16)))

Equality look-ups use blind indexes: HMAC-SHA256 under a separate index key, over a
domain-separated value, truncated to 128 bits and stored as hex.

Keys: data keys and the index key are random 256-bit keys, wrapped (AES-256-GCM) by a
key-encryption key (KEK) and kept in ``DATA_DIR/keys/keyring.json``. The KEK never lives in
the data directory: it comes from ``$PHIAUDIT_KEK`` (base64 or hex of 32 bytes), from the file
named by ``$PHIAUDIT_KEK_FILE``, or, for the embedded default only, from a file generated on
first run beside the data directory (``DATA_DIR.keys/kek``, mode 0600) with a warning that
production needs an external key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac as _hmac
import importlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import ConfigError, IntegrityError

__all__ = [
    "ENV_KEK",
    "ENV_KEK_FILE",
    "ENV_KMS",
    "BlindIndex",
    "ColumnKeys",
    "FieldCipher",
    "KeyRing",
    "KeyWrapper",
    "LocalKek",
    "default_kek_path",
    "key_wrapper",
]

_log = logging.getLogger("phiaudit.storage.keys")

#: Environment variable holding the key-encryption key (base64 or hex of 32 bytes).
ENV_KEK = "PHIAUDIT_KEK"
#: Environment variable naming a file that holds the key-encryption key.
ENV_KEK_FILE = "PHIAUDIT_KEK_FILE"
#: Environment variable naming a KMS plug-in, ``package.module:factory``.
ENV_KMS = "PHIAUDIT_KMS"

_VERSION = 1
_HEADER = 1 + 4 + 16 + 12
_AAD_PREFIX = b"phiaudit:v1|"
_WRAP_AAD = b"phiaudit:keyring:v1|"
_warned_generated_kek = False


def default_kek_path(data_dir: Path) -> Path:
    """Where the embedded default keeps a generated KEK: beside, never inside, the data dir."""
    data_dir = Path(data_dir).resolve()
    return data_dir.parent / (data_dir.name + ".keys") / "kek"


def _decode_key(text: str, source: str) -> bytes:
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 64:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError(f"{source}: the key-encryption key must be 32 bytes, base64 or hex")
    return raw


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_kek(data_dir: Path, *, create: bool) -> bytes:
    """Find the KEK: environment, named file, or (embedded default) the generated file."""
    global _warned_generated_kek
    env = os.environ.get(ENV_KEK)
    if env:
        return _decode_key(env, ENV_KEK)
    named = os.environ.get(ENV_KEK_FILE)
    if named:
        path = Path(named).resolve()
        if Path(data_dir).resolve() in path.parents:
            raise ConfigError(f"{ENV_KEK_FILE}: the key file must not be inside the data directory")
        try:
            return _decode_key(path.read_text(), ENV_KEK_FILE)
        except OSError as exc:
            raise ConfigError(f"{ENV_KEK_FILE}: cannot read the key file ({exc.strerror})") from exc
    path = default_kek_path(data_dir)
    if path.exists():
        return _decode_key(path.read_text(), str(path))
    if not create:
        raise ConfigError(f"no key-encryption key: set {ENV_KEK} or {ENV_KEK_FILE}")
    key = AESGCM.generate_key(bit_length=256)
    _write_private(path, base64.b64encode(key) + b"\n")
    if not _warned_generated_kek:
        _warned_generated_kek = True
        _log.warning(
            "generated a key-encryption key at %s for this embedded store; production needs an "
            "external key (%s, %s or a KMS)", path, ENV_KEK, ENV_KEK_FILE,
        )
    return key


@dataclass(frozen=True)
class _Key:
    key_id: int
    purpose: str  # "data" or "index"
    created: str
    material: bytes

    def __repr__(self) -> str:  # never print key material
        return f"_Key(key_id={self.key_id}, purpose={self.purpose!r}, material=[REDACTED])"


class KeyWrapper(Protocol):
    """Wraps and unwraps keys with the key-encryption key, wherever that key lives.

    The built-in ``LocalKek`` holds a 256-bit key given by the environment or a file. A KMS
    (cloud or HSM) plugs in through ``$PHIAUDIT_KMS = "package.module:factory"``: the factory
    returns an object with these two methods, which call the KMS; the key-encryption key then
    never enters this process. ``aad`` must be bound to the wrapped blob (AEAD).
    """

    def wrap(self, key: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, aad: bytes) -> bytes: ...


class LocalKek:
    """A key-encryption key held in this process: AES-256-GCM, ``nonce || ciphertext+tag``."""

    def __init__(self, kek: bytes) -> None:
        self._aead = AESGCM(kek)

    def __repr__(self) -> str:
        return "LocalKek([REDACTED])"

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(blob[:12], blob[12:], aad)


def key_wrapper(data_dir: Path, *, create: bool) -> KeyWrapper:
    """The configured key wrapper: a KMS plug-in (``$PHIAUDIT_KMS``) or the local KEK."""
    spec = os.environ.get(ENV_KMS)
    if spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr or "make_key_wrapper")
            wrapper = factory()
        except Exception as exc:
            raise ConfigError(f"{ENV_KMS}: cannot load the KMS plug-in {spec!r}") from exc
        if not callable(getattr(wrapper, "wrap", None)) or not callable(
                getattr(wrapper, "unwrap", None)):
            raise ConfigError(f"{ENV_KMS}: the plug-in must provide wrap() and unwrap()")
        return wrapper  # type: ignore[no-any-return]
    return LocalKek(load_kek(data_dir, create=create))


def unwrap_or_fail(wrapper: KeyWrapper, blob: bytes, aad: bytes, what: str) -> bytes:
    """Unwrap, mapping every failure (wrong key, KMS error) to one clear ConfigError."""
    try:
        return wrapper.unwrap(blob, aad)
    except InvalidTag:
        raise ConfigError(f"the key-encryption key does not open {what} (wrong key?)") from None
    except Exception as exc:
        raise ConfigError(f"the key-encryption key could not open {what} "
                          f"({type(exc).__name__})") from None


class KeyRing:
    """Data keys and index keys, wrapped by the KEK, kept in ``DATA_DIR/keys/keyring.json``.

    New rows use the active data key; old keys stay (wrapped) so that six-year-old rows can
    still be read.
    """

    def __init__(self, path: Path, wrapper: KeyWrapper, keys: list[_Key]) -> None:
        self._path = path
        self._wrapper = wrapper
        self._keys = {k.key_id: k for k in keys}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyRing(path={str(self._path)!r}, keys={len(self._keys)}, kek=[REDACTED])"

    @classmethod
    def open(cls, data_dir: Path, *, create: bool = True) -> KeyRing:
        data_dir = Path(data_dir)
        path = data_dir / "keys" / "keyring.json"
        wrapper = key_wrapper(data_dir, create=create and not path.exists())
        if not path.exists():
            if not create:
                raise ConfigError(f"no key ring at {path}")
            ring = cls(path, wrapper, [])
            ring._add("data")
            ring._add("index")
            ring._save()
            return ring
        try:
            doc = json.loads(path.read_text())
            entries = [(base64.b64decode(e["wrapped"]), e["purpose"], int(e["id"]), e["created"])
                       for e in doc["keys"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable key ring") from exc
        keys: list[_Key] = []
        for wrapped, purpose, key_id, created in entries:
            aad = _WRAP_AAD + f"{purpose}|{key_id}".encode()
            material = unwrap_or_fail(wrapper, wrapped, aad, "this key ring")
            keys.append(_Key(key_id, purpose, created, material))
        return cls(path, wrapper, keys)

    def _add(self, purpose: str) -> _Key:
        key_id = max(self._keys, default=0) + 1
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        key = _Key(key_id, purpose, created, AESGCM.generate_key(bit_length=256))
        self._keys[key_id] = key
        return key

    def _save(self) -> None:
        entries = []
        for key in sorted(self._keys.values(), key=lambda k: k.key_id):
            aad = _WRAP_AAD + f"{key.purpose}|{key.key_id}".encode()
            wrapped = self._wrapper.wrap(key.material, aad)
            entries.append({
                "id": key.key_id, "purpose": key.purpose, "created": key.created,
                "wrapped": base64.b64encode(wrapped).decode(),
            })
        doc = {"version": 1, "keys": entries}
        _write_private(self._path, json.dumps(doc, indent=1).encode())

    def rotate(self, purpose: str = "data") -> int:
        """Add a new active key for ``purpose`` and return its id; old keys are kept."""
        with self._lock:
            key = self._add(purpose)
            self._save()
            return key.key_id

    def active(self, purpose: str) -> _Key:
        keys = [k for k in self._keys.values() if k.purpose == purpose]
        if not keys:
            raise ConfigError(f"key ring has no {purpose} key")
        return max(keys, key=lambda k: k.key_id)

    def disk_key(self) -> bytes:
        """The key of the embedded store's encrypted disk (AES-256-CTR), created on first use.
        It is not rotated in place: ClickHouse keeps the first key of a table's files, so a new
        disk key means copying the tables."""
        with self._lock:
            keys = [k for k in self._keys.values() if k.purpose == "disk"]
            if not keys:
                keys = [self._add("disk")]
                self._save()
        return min(keys, key=lambda k: k.key_id).material

    def get(self, key_id: int) -> _Key:
        try:
            return self._keys[key_id]
        except KeyError:
            raise IntegrityError(f"unknown key id {key_id}") from None

    def status(self) -> list[dict[str, object]]:
        """Key ids, purposes and creation dates, no material."""
        active = {p: self.active(p).key_id for p in {k.purpose for k in self._keys.values()}}
        return [
            {"id": k.key_id, "purpose": k.purpose, "created": k.created,
             "active": active.get(k.purpose) == k.key_id}
            for k in sorted(self._keys.values(), key=lambda k: k.key_id)
        ]


class FieldCipher:
    """AES-256-GCM for PHI fields, bound to their event and column (see module docstring)."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        active = ring.active("data")
        self._key_id = active.key_id
        self._header_key = active.key_id.to_bytes(4, "big")
        self._aead = AESGCM(active.material)
        self._readers: dict[int, AESGCM] = {active.key_id: self._aead}
        self._pool = b""
        self._pool_at = 0
        self._pool_lock = threading.Lock()

    def _nonce(self) -> bytes:
        """A random 96-bit nonce. Drawn from the OS in blocks: one system call per 512."""
        with self._pool_lock:
            at = self._pool_at
            if at >= len(self._pool):
                self._pool, at = os.urandom(12 * 512), 0
            self._pool_at = at + 12
            return self._pool[at:at + 12]

    @property
    def key_id(self) -> int:
        return self._key_id

    def encrypt(self, column: str, event_id: bytes, plaintext: str | bytes) -> bytes:
        if isinstance(plaintext, str):
            plaintext = plaintext.encode("utf-8", "surrogatepass")
        data = plaintext
        nonce = self._nonce()
        aad = _AAD_PREFIX + column.encode() + b"|" + event_id
        return (
            b"\x01" + self._header_key + event_id + nonce + self._aead.encrypt(nonce, data, aad)
        )

    def decrypt(self, column: str, blob: bytes, event_id: bytes | None = None) -> bytes:
        """Authenticate and decrypt. ``event_id``, when known from the row, must match."""
        if not blob:
            return b""
        if len(blob) < _HEADER + 16 or blob[0] != _VERSION:
            raise IntegrityError(f"column {column}: not a phiaudit ciphertext")
        key_id = int.from_bytes(blob[1:5], "big")
        bound = blob[5:21]
        if event_id is not None and event_id != bound:
            raise IntegrityError(f"column {column}: ciphertext belongs to another event")
        aead = self._readers.get(key_id)
        if aead is None:
            aead = self._readers[key_id] = AESGCM(self._ring.get(key_id).material)
        aad = _AAD_PREFIX + column.encode() + b"|" + bound
        try:
            return aead.decrypt(blob[21:33], blob[33:], aad)
        except InvalidTag:
            raise IntegrityError(f"column {column}: ciphertext does not authenticate") from None

    def decrypt_text(self, column: str, blob: bytes, event_id: bytes | None = None) -> str:
        return self.decrypt(column, blob, event_id).decode("utf-8", "replace")


class BlindIndex:
    """HMAC-SHA256 blind indexes for equality look-ups on encrypted fields."""

    def __init__(self, ring: KeyRing) -> None:
        self._key = ring.active("index").material
        self._base = _hmac.new(self._key, digestmod=hashlib.sha256)

    def __call__(self, domain: str, value: str) -> str:
        if not value:
            return ""
        mac = self._base.copy()
        mac.update(domain.encode() + b"|" + value.encode("utf-8", "surrogatepass"))
        return mac.digest()[:16].hex()


@dataclass(frozen=True, repr=False)
class ColumnKeys:
    """The active data and index keys, for the receiver's compiled extractor, which encrypts
    and indexes in the stored layout of ``FieldCipher`` and ``BlindIndex``: ``01 || key id
    (4, big-endian) || event id (16) || nonce (12) || ciphertext || tag`` with AAD
    ``"phiaudit:v1|" || column || "|" || event id`` (the extractor writes the prefix itself; a
    test decrypts its output with ``FieldCipher``). For code inside this process; never
    printed."""

    key_id: int
    data_key: bytes
    index_key: bytes

    def __repr__(self) -> str:
        return f"ColumnKeys(key_id={self.key_id}, [REDACTED])"

    @classmethod
    def from_ring(cls, ring: KeyRing) -> ColumnKeys:
        data = ring.active("data")
        return cls(data.key_id, data.material, ring.active("index").material)
