"""Sender tokens: bearer credentials that OTLP senders (applications, Collectors) present.

Kept apart from the reader credentials of ``_credentials.py`` on purpose: a sender token can
only write (send OTLP), a reader token can only read (``phiaudit sql``); neither works for
the other. Tokens are random (256 bits, prefix ``phis_``), shown once when issued, and stored
only as SHA-256 digests in ``DATA_DIR/credentials/senders.json`` (mode 0600)::

    {"version": 1, "senders": [{"name": "ehr-api", "sha256": "...", "created": "...",
                                "revoked": false}]}

The sender's ``name`` is the identity stored with every event it sends (``sender`` column,
as ``token:NAME``). The file is re-read (at most once a second) when it changes, so tokens
issued or revoked by ``phiaudit sender`` take effect without a restart.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import secrets
import threading
import time
from pathlib import Path

from ._crypto import _write_private
from ._errors import ConfigError

__all__ = ["SenderTokens"]

_PREFIX = "phis_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/-]{0,127}$")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class SenderTokens:
    """The sender token store; ``authenticate()`` is cheap enough for every request."""

    def __init__(self, data_dir: Path, *, reload_interval: float = 1.0) -> None:
        self.dir = Path(data_dir) / "credentials"
        self.path = self.dir / "senders.json"
        self._lock = threading.Lock()
        self._interval = reload_interval
        self._checked = 0.0
        self._mtime: float | None = None
        self._entries: list[dict[str, object]] = []
        self._by_digest: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"SenderTokens(path={str(self.path)!r}, tokens=[REDACTED])"

    def _load(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self._interval:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._entries, self._by_digest, self._mtime = [], {}, None
            return
        if mtime == self._mtime:
            return
        try:
            doc = json.loads(self.path.read_text())
            entries = list(doc["senders"])
            by_digest = {str(e["sha256"]): str(e["name"]) for e in entries
                         if not e.get("revoked")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path}: unreadable sender tokens file") from exc
        self._entries, self._by_digest, self._mtime = entries, by_digest, mtime

    def _save(self) -> None:
        _write_private(self.path,
                       json.dumps({"version": 1, "senders": self._entries}, indent=1).encode())

    @property
    def configured(self) -> bool:
        """True when at least one unrevoked sender token exists."""
        with self._lock:
            self._load(force=True)
            return bool(self._by_digest)

    def names(self) -> list[str]:
        with self._lock:
            self._load(force=True)
            return sorted({str(e["name"]) for e in self._entries if not e.get("revoked")})

    def issue(self, name: str) -> str:
        """Create a token for sender ``name`` and return it (shown once, never stored)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError("sender: a name of letters, digits and ._@/- (at most 128)")
        token = _PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._load(force=True)
            self._entries.append({
                "name": name, "sha256": _digest(token),
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            })
            self._save()
            self._mtime = None
            self._load(force=True)
        return token

    def revoke(self, name: str) -> int:
        """Revoke every token of sender ``name``; return how many were revoked."""
        with self._lock:
            self._load(force=True)
            n = 0
            for entry in self._entries:
                if entry.get("name") == name and not entry.get("revoked"):
                    entry["revoked"] = True
                    n += 1
            if n:
                self._save()
                self._mtime = None
                self._load(force=True)
        return n

    def authenticate(self, token: str) -> str | None:
        """The sender name of ``token``, or None when it is unknown or revoked."""
        if not token:
            return None
        digest = _digest(token.strip())
        with self._lock:
            self._load()
            return self._by_digest.get(digest)
