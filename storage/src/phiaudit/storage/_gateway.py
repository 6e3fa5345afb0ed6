"""The query gateway: read-only SQL over the audit trail for the security and compliance roles.

Every call, refused ones too, is recorded in ``access_log`` before any result is returned; if
that record cannot be written, no result is returned (fail closed). Statements must be one
``SELECT`` (or ``WITH ... SELECT``); they run with ``readonly=1`` under an engine user that can
only SELECT and INSERT on the phiaudit database, and ``INTO OUTFILE`` is refused.

``blind_index('patient', 'P-123')`` (domains: ``patient``, ``resource`` as ``Type/id``,
``client``) is replaced by the blind index before the statement runs, so that investigators
can match encrypted fields without decrypting the table. With ``decrypt=True``, columns named
like an encrypted column (``patient_id``, ``resource_id``, ``query``, ``recipient``,
``client_address``, ``device_id``, ``extra``, ``statement``) come back in clear.
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._credentials import ROLES, Credentials, Principal
from ._errors import (
    AccessDenied,
    IntegrityError,
    MemoryLimitExceeded,
    PermanentError,
    PhiAuditError,
)
from ._records import AccessRecord, RecordEncoder
from ._schema import ENCRYPTED_COLUMNS

__all__ = ["QueryGateway", "QueryResult", "check_statement"]

_ENCRYPTED = frozenset().union(*ENCRYPTED_COLUMNS.values())
_STRINGS = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`", re.S)
_COMMENTS = re.compile(r"--[^\n]*|#[^\n]*|/\*.*?\*/", re.S)
_BIDX = re.compile(
    r"blind_index\s*\(\s*'(patient|resource|client)'\s*,\s*'((?:[^'\\]|\\.|'')*)'\s*\)", re.I)
_HEX_COLUMNS = frozenset({"hash", "prev_hash"})
_FORBIDDEN = re.compile(r"\b(OUTFILE|INFILE)\b", re.I)


def check_statement(sql: str) -> None:
    """Refuse anything but a single SELECT. Raises AccessDenied with a reason (no PHI)."""
    bare = _COMMENTS.sub(" ", _STRINGS.sub("''", sql)).strip()
    bare = bare.rstrip().rstrip(";").rstrip()
    if not bare:
        raise AccessDenied("empty statement")
    if ";" in bare:
        raise AccessDenied("one statement at a time")
    first = re.match(r"[\s(]*([A-Za-z]+)", bare)
    if not first or first.group(1).upper() not in ("SELECT", "WITH"):
        raise AccessDenied("only SELECT statements are allowed")
    if _FORBIDDEN.search(bare):
        raise AccessDenied("INTO OUTFILE is not allowed")


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]


def _render(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, list):
        return [_render(v) for v in value]
    if isinstance(value, tuple):
        return [_render(v) for v in value]
    if isinstance(value, dict):
        return {_render(k): _render(v) for k, v in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.isoformat()
    if isinstance(value, _dt.date):
        return value.isoformat()
    return value


class QueryGateway:
    """Authenticates, checks, runs, decrypts and records queries."""

    def __init__(
        self,
        store: Any,
        encoder: RecordEncoder,
        credentials: Credentials,
        record_access: Callable[[AccessRecord], None],
        *,
        max_rows: int = 100_000,
        max_seconds: int = 120,
        max_memory_bytes: int = 0,
    ) -> None:
        self._store = store
        self._encoder = encoder
        self._credentials = credentials
        self._record = record_access
        self._max_rows = max_rows
        self._max_seconds = max_seconds
        #: the engine is shared with the ingestion: one query may not take the memory the
        #: audit trail needs (0: no limit)
        self._max_memory = max_memory_bytes
        self.integrity_failures = 0

    def run(self, token: str | None, sql: str, *, decrypt: bool = False,
            interface: str = "service") -> QueryResult:
        principal = Principal("", "")
        try:
            principal = self._credentials.authenticate(token)
            if principal.role not in ROLES:
                raise AccessDenied("this role may not read the audit trail")
            check_statement(sql)
            result = self._execute(sql, decrypt)
        except AccessDenied as exc:
            self._log(principal, sql, decrypt, interface, 0, "denied", str(exc))
            raise
        except PhiAuditError as exc:
            self._log(principal, sql, decrypt, interface, 0, "error", type(exc).__name__)
            raise
        self._log(principal, sql, decrypt, interface, len(result.rows), "ok", "")
        return result

    def _log(self, who: Principal, sql: str, decrypt: bool, interface: str, rows: int,
             outcome: str, reason: str) -> None:
        self._record(AccessRecord(
            principal=who.name or "(unauthenticated)", role=who.role, interface=interface,
            statement=sql, decrypt=decrypt, rows_returned=rows, outcome=outcome,
            reason=reason[:200],
        ))

    def _execute(self, sql: str, decrypt: bool) -> QueryResult:
        index = self._encoder.index

        def substitute(m: re.Match[str]) -> str:
            value = m.group(2).replace("\\'", "'").replace("''", "'")
            return "'" + index(m.group(1).lower(), value) + "'"

        statement = _BIDX.sub(substitute, sql).strip().rstrip(";")
        settings = {
            "readonly": 1, "max_result_rows": self._max_rows, "result_overflow_mode": "throw",
            "max_execution_time": self._max_seconds,
        }
        if self._max_memory:
            settings["max_memory_usage"] = self._max_memory
        try:
            columns, rows = self._store.query(statement, settings=settings, binary=True)
        except MemoryLimitExceeded as exc:
            if not self._max_memory:
                raise
            # the same statement would need the same memory again: not worth a retry
            raise PermanentError(
                f"the query needs more than the {self._max_memory >> 20} MiB of memory a query "
                "may use in the service (query_memory_mb): narrow it (fewer rows, columns or "
                "groups)") from exc
        enc_positions = [i for i, c in enumerate(columns) if c in _ENCRYPTED]
        id_pos = columns.index("event_id") if "event_id" in columns else None
        hex_positions = [i for i, c in enumerate(columns) if c in _HEX_COLUMNS]
        out: list[list[Any]] = []
        for row in rows:
            values = list(row)
            for i in enc_positions:
                blob = values[i]
                if not isinstance(blob, bytes | bytearray):
                    continue
                if decrypt:
                    bound = values[id_pos].bytes if id_pos is not None and isinstance(
                        values[id_pos], uuid.UUID) else None
                    try:
                        values[i] = self._encoder.cipher.decrypt_text(columns[i], bytes(blob),
                                                                      bound)
                    except IntegrityError:
                        values[i] = "[does not authenticate]"
                        self.integrity_failures += 1
                else:
                    values[i] = ("enc:" + base64.b64encode(blob).decode()) if blob else ""
            for i in hex_positions:
                if isinstance(values[i], bytes | bytearray) and len(values[i]) == 32:
                    values[i] = bytes(values[i]).hex()
            out.append([_render(v) for v in values])
        return QueryResult(columns, out)
