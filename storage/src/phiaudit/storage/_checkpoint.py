"""Signed checkpoints of the hash chains, and the anchors that keep them out of reach.

A checkpoint says "the chain of writer W in table T had N rows, and the RFC 6962 Merkle tree
hash of their chain hashes was R, at time t", signed with Ed25519. Its signed body is text::

    phiaudit-checkpoint/1
    origin phiaudit/<database>/<table>
    writer <writer id>
    size <tree size, decimal>
    root <root hash, 64 lowercase hex digits>
    time <microseconds since the Unix epoch, UTC, decimal>

(each line ends with ``\\n``). The signature is Ed25519 over exactly those bytes. Written out
(to an anchor, or by ``phiaudit prove``) a checkpoint is the body followed by an empty line
and one signature line, as in a C2SP signed note::

    \\u2014 <key id> <base64 signature>

The key id is the first 16 hex digits of SHA-256 of the raw 32-byte Ed25519 public key.

Keys: the signing key lives with the other keys, in ``DATA_DIR/keys/signing.json``, its
private half wrapped (AES-256-GCM) by the key-encryption key like the data keys; the public
half is kept there in clear and copied to every anchor, so that verifying needs no secret.
Nothing of it is stored in ClickHouse.

Anchors: every checkpoint goes to the ``checkpoints`` table *and* to an anchor that the
database administrator cannot rewrite. ``DirectoryAnchor`` writes one file per checkpoint,
created with ``O_EXCL`` (never overwritten) and fsynced, in a directory outside the data
directory (default ``DATA_DIR.anchor/``, beside it). ``Anchor`` is the interface for others
(an object-lock bucket, a transparency log).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._crypto import _write_private, key_wrapper, unwrap_or_fail
from ._durable import fsync_dir
from ._errors import ConfigError, IntegrityError, StorageUnavailable
from ._schema import CHECKPOINT_COLUMNS

__all__ = [
    "Anchor",
    "Checkpoint",
    "DirectoryAnchor",
    "SigningKey",
    "default_anchor_dir",
    "load_checkpoints",
    "origin_for",
    "public_keys",
    "store_checkpoint",
]

_HEADER = "phiaudit-checkpoint/1"
_SIG_PREFIX = "\u2014 "
_WRAP_AAD = b"phiaudit:signing:v1|ed25519|"


def default_anchor_dir(data_dir: Path) -> Path:
    """Beside, never inside, the data directory: ``DATA_DIR.anchor/``."""
    data_dir = Path(data_dir).resolve()
    return data_dir.parent / (data_dir.name + ".anchor")


def origin_for(database: str, table: str) -> str:
    return f"phiaudit/{database}/{table}"


def key_id_of(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def _clean(value: str, what: str) -> str:
    if not value or any(c in value for c in "\n\r ") or len(value) > 512:
        raise ValueError(f"checkpoint {what}: non-empty, no spaces or line breaks")
    return value


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    writer_id: str
    tree_size: int
    root_hash: bytes
    time_us: int
    key_id: str = ""
    signature: bytes = b""

    @property
    def table(self) -> str:
        return self.origin.rsplit("/", 1)[-1]

    @property
    def time(self) -> _dt.datetime:
        return _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(microseconds=self.time_us)

    def body(self) -> bytes:
        return (f"{_HEADER}\norigin {_clean(self.origin, 'origin')}\n"
                f"writer {_clean(self.writer_id, 'writer')}\nsize {int(self.tree_size)}\n"
                f"root {self.root_hash.hex()}\ntime {int(self.time_us)}\n").encode()

    def note(self) -> str:
        """The signed note: body, empty line, signature line."""
        sig = base64.b64encode(self.signature).decode()
        return self.body().decode() + f"\n{_SIG_PREFIX}{self.key_id} {sig}\n"

    @classmethod
    def parse(cls, note: str) -> Checkpoint:
        try:
            body, sig_line = note.split("\n\n", 1)
            lines = body.split("\n")
            if lines[0] != _HEADER or len(lines) != 6:
                raise ValueError("not a phiaudit checkpoint")
            fields = dict(line.split(" ", 1) for line in lines[1:])
            sig_line = sig_line.strip("\n")
            if not sig_line.startswith(_SIG_PREFIX):
                raise ValueError("no signature line")
            key_id, sig = sig_line[len(_SIG_PREFIX):].split(" ", 1)
            cp = cls(fields["origin"], fields["writer"], int(fields["size"]),
                     bytes.fromhex(fields["root"]), int(fields["time"]), key_id,
                     base64.b64decode(sig, validate=True))
        except (ValueError, KeyError) as exc:
            raise IntegrityError("unreadable checkpoint") from exc
        if cp.body() != (body + "\n").encode():
            raise IntegrityError("unreadable checkpoint (not in canonical form)")
        return cp

    def verify(self, keys: dict[str, bytes]) -> bool | None:
        """True when signed by one of ``keys`` (key id -> raw public key); None when the key
        is unknown; False when the signature is wrong."""
        public = keys.get(self.key_id)
        if public is None:
            return None
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(self.signature, self.body())
        except (InvalidSignature, ValueError):
            return False
        return True


class SigningKey:
    """The Ed25519 checkpoint signing key, wrapped by the KEK in ``DATA_DIR/keys/signing.json``."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of(self.public)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, private=[REDACTED])"

    @staticmethod
    def path(data_dir: Path) -> Path:
        return Path(data_dir) / "keys" / "signing.json"

    _lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: Path, *, create: bool = True) -> SigningKey:
        path = cls.path(data_dir)
        with cls._lock:
            kek = key_wrapper(Path(data_dir), create=False)
            if not path.exists():
                if not create:
                    raise ConfigError(f"no checkpoint signing key at {path}")
                key = cls(Ed25519PrivateKey.generate())
                raw = key._private.private_bytes_raw()
                wrapped = kek.wrap(raw, _WRAP_AAD + key.key_id.encode())
                doc = {"version": 1, "keys": [{
                    "id": key.key_id, "algorithm": "ed25519",
                    "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "public": base64.b64encode(key.public).decode(),
                    "wrapped": base64.b64encode(wrapped).decode()}]}
                _write_private(path, json.dumps(doc, indent=1).encode())
                return key
            try:
                entry = json.loads(path.read_text())["keys"][-1]
                wrapped = base64.b64decode(entry["wrapped"])
                raw = unwrap_or_fail(kek, wrapped, _WRAP_AAD + str(entry["id"]).encode(),
                                     "the signing key")
                key = cls(Ed25519PrivateKey.from_private_bytes(raw))
            except InvalidTag as exc:
                raise ConfigError("the key-encryption key does not open the signing key") from exc
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise ConfigError(f"{path}: unreadable signing key") from exc
            if key.key_id != entry["id"]:
                raise ConfigError(f"{path}: signing key id does not match its key")
            return key

    def sign(self, cp: Checkpoint) -> Checkpoint:
        sig = self._private.sign(cp.body())
        return Checkpoint(cp.origin, cp.writer_id, cp.tree_size, cp.root_hash, cp.time_us,
                          self.key_id, sig)


def public_keys(data_dir: Path) -> dict[str, bytes]:
    """The checkpoint public keys kept beside the key ring (no secret needed)."""
    path = SigningKey.path(data_dir)
    try:
        doc = json.loads(path.read_text())
        return {str(e["id"]): base64.b64decode(e["public"]) for e in doc["keys"]}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable signing key file") from exc


class Anchor(Protocol):
    """Somewhere outside the database's reach that keeps every checkpoint, write-once."""

    def put(self, cp: Checkpoint) -> None:
        """Keep ``cp`` durably; never replace an existing checkpoint."""

    def put_public_key(self, key_id: str, public: bytes) -> None:
        """Keep a signing public key (idempotent)."""

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint kept, in no particular order."""

    def public_keys(self) -> dict[str, bytes]:
        """Every public key kept."""


def _write_once(path: Path, data: bytes) -> None:
    """Write ``path`` once, whole or not at all: the content goes to a temporary file that is
    fsynced and then hard-linked to its name (which fails if the name exists), so a reader
    never sees a partial checkpoint and a crash never leaves an empty one behind."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}.partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        if path.read_bytes() == data:
            return  # the same checkpoint again (a retry): nothing to do
        raise IntegrityError(f"anchor: {path.name} exists with other content") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class DirectoryAnchor:
    """One file per checkpoint: ``DIR/<origin>/<writer>/<size>-<time>.checkpoint``
    (names percent-encoded), created with O_EXCL and fsynced; public keys in
    ``DIR/keys/<key id>.pub`` (base64 of the raw key)."""

    def __init__(self, path: Path, data_dir: Path | None = None) -> None:
        self.path = Path(path).resolve()
        if data_dir is not None:
            d = Path(data_dir).resolve()
            if self.path == d or d in self.path.parents:
                raise ConfigError("anchor_dir: must be outside the data directory")

    def __repr__(self) -> str:
        return f"DirectoryAnchor({str(self.path)!r})"

    def _file(self, cp: Checkpoint) -> Path:
        return (self.path / quote(cp.origin, safe="") / quote(cp.writer_id, safe="")
                / f"{cp.tree_size:020d}-{cp.time_us:020d}.checkpoint")

    def put(self, cp: Checkpoint) -> None:
        _write_once(self._file(cp), cp.note().encode())

    def put_public_key(self, key_id: str, public: bytes) -> None:
        _write_once(self.path / "keys" / f"{quote(key_id, safe='')}.pub",
                    base64.b64encode(public) + b"\n")

    def checkpoints(self) -> list[Checkpoint]:
        out: list[Checkpoint] = []
        if not self.path.is_dir():
            return out
        for origin_dir in sorted(self.path.iterdir()):
            if origin_dir.name == "keys" or not origin_dir.is_dir():
                continue
            for writer_dir in sorted(origin_dir.iterdir()):
                for f in sorted(writer_dir.glob("*.checkpoint")):
                    cp = Checkpoint.parse(f.read_text())
                    if (quote(cp.origin, safe="") != origin_dir.name
                            or quote(cp.writer_id, safe="") != writer_dir.name):
                        raise IntegrityError(f"anchor: {f.name} is filed under another chain")
                    out.append(cp)
        return out

    def public_keys(self) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        kdir = self.path / "keys"
        if kdir.is_dir():
            for f in kdir.glob("*.pub"):
                keys[unquote(f.stem)] = base64.b64decode(f.read_text().strip())
        return keys


def store_checkpoint(store: Any, cp: Checkpoint) -> None:
    """Insert ``cp`` into the ``checkpoints`` table (idempotent per checkpoint)."""
    row = [cp.origin, cp.writer_id, cp.tree_size, cp.root_hash, cp.time_us, cp.key_id,
           cp.signature]
    token = "checkpoint:" + hashlib.sha256(cp.note().encode()).hexdigest()
    if store.insert_rows("checkpoints", CHECKPOINT_COLUMNS, [row], token):
        return
    # the engine kept no part for it: this very checkpoint stored before (a duplicate), or the
    # row lost (chDB's streaming insert does not report a failed part write)
    _, found = store.query(
        "SELECT count() FROM checkpoints WHERE writer_id = {w:String} AND origin = {o:String} "
        "AND tree_size = {n:UInt64} AND toUnixTimestamp64Micro(time) = {t:Int64}",
        {"w": cp.writer_id, "o": cp.origin, "n": cp.tree_size, "t": cp.time_us})
    if not found or not int(found[0][0]):
        raise StorageUnavailable("the store did not keep the checkpoint row: retried later")


def load_checkpoints(store: Any) -> list[Checkpoint]:
    """Every checkpoint in the ``checkpoints`` table."""
    _, rows = store.query(
        "SELECT origin, writer_id, tree_size, root_hash, toUnixTimestamp64Micro(time), key_id, "
        "signature FROM checkpoints ORDER BY writer_id, tree_size, time", binary=True)
    out = []
    for origin, writer, size, root, time_us, key_id, sig in rows:
        out.append(Checkpoint(_text(origin), _text(writer), int(size), bytes(root), int(time_us),
                              _text(key_id), bytes(sig)))
    return out


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)
