"""phiaudit.storage: the audit record model, schema, field encryption and keys, hash chains,
the ClickHouse writer and the query gateway.

Imports nothing else of phiaudit. The service (``phiaudit.receiver``) and the rule engine
(``phiaudit.rules``) build on it.
"""

from ._chain import GENESIS, ChainState, canonical_encoder, link_rows
from ._checkpoint import (
    Anchor,
    Checkpoint,
    DirectoryAnchor,
    SigningKey,
    default_anchor_dir,
    load_checkpoints,
    origin_for,
    public_keys,
    store_checkpoint,
)
from ._credentials import ROLES, Credentials, Principal
from ._crypto import (
    ENV_KEK,
    ENV_KEK_FILE,
    ENV_KMS,
    BlindIndex,
    FieldCipher,
    KeyRing,
    KeyWrapper,
    LocalKek,
    default_kek_path,
    key_wrapper,
)
from ._errors import (
    AccessDenied,
    ConfigError,
    IntegrityError,
    PermanentError,
    PhiAuditError,
    StorageUnavailable,
)
from ._gateway import QueryGateway, QueryResult, check_statement
from ._merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from ._records import ACTIONS, AccessRecord, AuditEvent, RecordEncoder
from ._schema import (
    ACCESS_LOG_COLUMNS,
    AUDIT_COLUMNS,
    CHECKPOINT_COLUMNS,
    ENCRYPTED_COLUMNS,
    SCHEMA_VERSION,
    TRACE_COLUMNS,
    Column,
    migration_statements,
)
from ._senders import SenderTokens
from ._spool import BatchSpool, SpoolFull
from ._store import ENCRYPTED_POLICY, Store, StoreLocation, admin_client, migrate
from ._verify import CHAINED_TABLES, Finding, VerifyReport, leaf_sql, verify
from ._writer import BatchWriter, Overloaded, TableSpec, WriterStats

__all__ = [
    "ACCESS_LOG_COLUMNS",
    "ACTIONS",
    "AUDIT_COLUMNS",
    "CHAINED_TABLES",
    "CHECKPOINT_COLUMNS",
    "ENCRYPTED_COLUMNS",
    "ENCRYPTED_POLICY",
    "ENV_KEK",
    "ENV_KEK_FILE",
    "ENV_KMS",
    "GENESIS",
    "ROLES",
    "SCHEMA_VERSION",
    "TRACE_COLUMNS",
    "AccessDenied",
    "AccessRecord",
    "Anchor",
    "AuditEvent",
    "BatchSpool",
    "BatchWriter",
    "BlindIndex",
    "ChainState",
    "Checkpoint",
    "Column",
    "CompactRange",
    "ConfigError",
    "Credentials",
    "DirectoryAnchor",
    "FieldCipher",
    "Finding",
    "IntegrityError",
    "KeyRing",
    "KeyWrapper",
    "LocalKek",
    "Overloaded",
    "PermanentError",
    "PhiAuditError",
    "Principal",
    "QueryGateway",
    "QueryResult",
    "RecordEncoder",
    "SenderTokens",
    "SigningKey",
    "SpoolFull",
    "StorageUnavailable",
    "Store",
    "StoreLocation",
    "TableSpec",
    "VerifyReport",
    "WriterStats",
    "admin_client",
    "canonical_encoder",
    "check_statement",
    "consistency_proof",
    "default_anchor_dir",
    "default_kek_path",
    "inclusion_proof",
    "key_wrapper",
    "leaf_hash",
    "leaf_sql",
    "link_rows",
    "load_checkpoints",
    "migrate",
    "migration_statements",
    "origin_for",
    "public_keys",
    "root_hash",
    "store_checkpoint",
    "verify",
    "verify_consistency",
    "verify_inclusion",
]
