"""The exception hierarchy of phiaudit, written out once.

Every error that crosses a component boundary is one of these. Third-party errors
(ClickHouse, cryptography, gRPC) are mapped at the boundary with ``raise ... from exc``.
Messages never contain PHI: they name the kind of thing that went wrong, a key path, a
column name or an event id, never a field value.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ConfigError",
    "IntegrityError",
    "MemoryLimitExceeded",
    "PermanentError",
    "PhiAuditError",
    "StorageUnavailable",
]


class PhiAuditError(Exception):
    """Base class of every error phiaudit raises on purpose."""


class ConfigError(PhiAuditError):
    """A configuration is invalid. ``errors`` lists every problem with its key path."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("invalid configuration: " + "; ".join(self.errors))


class AccessDenied(PhiAuditError):
    """Missing or wrong credential, a role that may not do this, or a forbidden statement."""


class StorageUnavailable(PhiAuditError):
    """The store cannot take or serve data right now. Retryable."""


class MemoryLimitExceeded(StorageUnavailable):
    """A query needed more memory than it may use (``max_memory_usage``, or the engine's own
    limit). Retryable as a whole; a query that always needs more must be made smaller."""


class PermanentError(PhiAuditError):
    """A request that will never succeed as it is (bad data, bad query). Not retryable."""


class IntegrityError(PhiAuditError):
    """Stored data does not authenticate: a ciphertext tag, a key id or a chain link is wrong."""
