"""phiaudit.storage: the audit record model, schema, field encryption and keys, hash chains,
the ClickHouse writer and the query gateway.

Imports nothing else of phiaudit. The service (``phiaudit.receiver``) and the rule engine
(``phiaudit.rules``) build on it.
"""

from ._chain import GENESIS, ChainState, canonical_encoder, link_rows
from ._credentials import ROLES, Credentials, Principal
from ._crypto import ENV_KEK, ENV_KEK_FILE, BlindIndex, FieldCipher, KeyRing, default_kek_path
from ._errors import (
    AccessDenied,
    ConfigError,
    IntegrityError,
    PermanentError,
    PhiAuditError,
    StorageUnavailable,
)
from ._gateway import QueryGateway, QueryResult, check_statement
from ._records import ACTIONS, AccessRecord, AuditEvent, RecordEncoder
from ._schema import (
    ACCESS_LOG_COLUMNS,
    AUDIT_COLUMNS,
    ENCRYPTED_COLUMNS,
    SCHEMA_VERSION,
    TRACE_COLUMNS,
    Column,
    migration_statements,
)
from ._store import Store, StoreLocation, migrate
from ._writer import BatchWriter, Overloaded, TableSpec, WriterStats

__all__ = [
    "ACCESS_LOG_COLUMNS",
    "ACTIONS",
    "AUDIT_COLUMNS",
    "ENCRYPTED_COLUMNS",
    "ENV_KEK",
    "ENV_KEK_FILE",
    "GENESIS",
    "ROLES",
    "SCHEMA_VERSION",
    "TRACE_COLUMNS",
    "AccessDenied",
    "AccessRecord",
    "AuditEvent",
    "BatchWriter",
    "BlindIndex",
    "ChainState",
    "Column",
    "ConfigError",
    "Credentials",
    "FieldCipher",
    "IntegrityError",
    "KeyRing",
    "Overloaded",
    "PermanentError",
    "PhiAuditError",
    "Principal",
    "QueryGateway",
    "QueryResult",
    "RecordEncoder",
    "StorageUnavailable",
    "Store",
    "StoreLocation",
    "TableSpec",
    "WriterStats",
    "canonical_encoder",
    "check_statement",
    "default_kek_path",
    "link_rows",
    "migrate",
    "migration_statements",
]
