"""Credentials for reading the audit trail: bearer tokens bound to a principal and a role.

Tokens are random (256 bits), shown once, and stored only as SHA-256 digests in
``DATA_DIR/credentials/tokens.json`` (mode 0600). The first run of the service creates the
initial ``security`` credential in ``DATA_DIR/credentials/admin.token`` (mode 0600).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from ._crypto import _write_private
from ._errors import AccessDenied, ConfigError

__all__ = ["ROLES", "Credentials", "Principal"]

#: Roles that may read the audit trail.
ROLES = frozenset({"security", "compliance"})
_PREFIX = "phia_"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Credentials:
    """The token store. Re-reads its file when it changes (tokens issued by the CLI)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "credentials"
        self.path = self.dir / "tokens.json"
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._entries: list[dict[str, str]] = []

    def __repr__(self) -> str:
        return f"Credentials(path={str(self.path)!r}, tokens=[REDACTED])"

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._entries, self._mtime = [], None
            return
        if mtime == self._mtime:
            return
        try:
            doc = json.loads(self.path.read_text())
            self._entries = list(doc["tokens"])
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{self.path}: unreadable credentials file") from exc
        self._mtime = mtime

    def _save(self) -> None:
        _write_private(self.path,
                       json.dumps({"version": 1, "tokens": self._entries}, indent=1).encode())

    def issue(self, principal: str, role: str) -> str:
        """Create a credential and return the token (shown once, never stored)."""
        if role not in ROLES:
            raise ConfigError(f"role: must be one of {sorted(ROLES)}")
        if not principal or len(principal) > 128 or not principal.isprintable():
            raise ConfigError("principal: a printable name of at most 128 characters")
        token = _PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._load()
            self._entries.append({
                "principal": principal, "role": role, "sha256": _digest(token),
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            })
            self._save()
            self._mtime = None
        return token

    def ensure_admin(self) -> Path | None:
        """First run: create the initial security credential; return its file if created."""
        admin = self.dir / "admin.token"
        with self._lock:
            self._load()
            if self._entries or admin.exists():
                return None
        token = self.issue("security-admin", "security")
        fd = os.open(admin, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return admin

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise AccessDenied("no credential: set PHIAUDIT_TOKEN or use --token-file")
        digest = _digest(token.strip())
        with self._lock:
            self._load()
            entries = list(self._entries)
        for entry in entries:
            if hmac.compare_digest(entry["sha256"], digest):
                if entry.get("revoked"):
                    break
                return Principal(entry["principal"], entry["role"])
        raise AccessDenied("invalid credential")
