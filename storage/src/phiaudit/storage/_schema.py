"""The stored tables and their migrations.

Every table is plain MergeTree (never Replacing/Collapsing: a user who may only INSERT could
otherwise replace or cancel rows), partitioned by month, with no TTL: retention is enforced by
phiaudit itself (six years at least). Table and column names are constants of this module and
are the only identifiers ever formatted into SQL; values always travel as parameters or as
inserted data.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ACCESS_LOG_COLUMNS",
    "ALERT_COLUMNS",
    "AUDIT_COLUMNS",
    "CARE_COLUMNS",
    "CHECKPOINT_COLUMNS",
    "DELIVERY_COLUMNS",
    "ENCRYPTED_COLUMNS",
    "HOLD_COLUMNS",
    "INFRA_COLUMNS",
    "ROLLUP_COLUMNS",
    "RULE_RUN_COLUMNS",
    "SCHEMA_VERSION",
    "TRACE_COLUMNS",
    "Column",
    "migration_statements",
]

SCHEMA_VERSION = 2  # 2: infra_events, infra_rollups, alerts, care_relationships, rule_runs


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    kind: str = "plain"  # plain | encrypted | chain
    comment: str = ""
    #: the column's CODEC; "" is the default (LZ4), except where ``stored_codec`` says
    codec: str = ""

    @property
    def stored_codec(self) -> str:
        """``NONE`` for random content (ciphertexts, digests, blind indexes, random ids):
        LZ4 cannot shrink it, and compressing it again at every merge was wasted work."""
        if self.codec:
            return self.codec
        random_content = (self.kind == "encrypted" or self.name.endswith("_bidx")
                          or self.name in ("hash", "prev_hash"))
        return "NONE" if random_content else ""


_CHAIN = [
    Column("writer_id", "LowCardinality(String)", "chain", "which writer appended the row"),
    Column("seq", "UInt64", "chain", "per-writer sequence number, gap-free"),
    Column("prev_hash", "FixedString(32)", "chain", "hash of the writer's previous row"),
    Column("hash", "FixedString(32)", "chain",
           "SHA-256(prev_hash, writer, seq, SHA-256(canonical row))"),
]

#: audit_events: one row per audit event per patient touched.
AUDIT_COLUMNS: list[Column] = [
    Column("event_id", "UUID", comment="unique per row", codec="NONE"),
    Column("event_time", "DateTime64(6, 'UTC')", comment="when: span start (UTC, us)"),
    Column("received_time", "DateTime64(6, 'UTC')", comment="when the receiver took it"),
    Column("time_source", "LowCardinality(String)", comment="span | receiver (span time absurd)"),
    Column("source", "LowCardinality(String)", comment="span | span_event | log"),
    Column("action", "LowCardinality(String)"),
    Column("outcome", "LowCardinality(String)", comment="success | failure"),
    Column("outcome_reason", "LowCardinality(String)", comment="explicit, status, http, exception"),
    Column("actor_id", "String", comment="who: enduser.id / user.id"),
    Column("actor_type", "LowCardinality(String)"),
    Column("actor_roles", "Array(LowCardinality(String))"),
    Column("service_name", "LowCardinality(String)"),
    Column("host_name", "LowCardinality(String)"),
    Column("resource_type", "LowCardinality(String)"),
    Column("resource_id", "String", "encrypted"),
    Column("resource_bidx", "String", comment="blind index of type/id"),
    Column("patient_id", "String", "encrypted"),
    Column("patient_bidx", "String", comment="blind index of the patient id"),
    Column("record_count", "UInt64"),
    Column("query", "String", "encrypted"),
    Column("purpose", "LowCardinality(String)"),
    Column("recipient", "String", "encrypted"),
    Column("client_address", "String", "encrypted"),
    Column("client_bidx", "String", comment="blind index of the client address"),
    Column("user_agent", "String"),
    Column("device_id", "String", "encrypted"),
    Column("http_method", "LowCardinality(String)"),
    Column("http_route", "LowCardinality(String)"),
    Column("http_status", "UInt16"),
    Column("trace_id", "String", comment="hex, as in otel_traces.TraceId"),
    Column("span_id", "String", codec="NONE"),
    Column("sender", "LowCardinality(String)", comment="authenticated client identity"),
    Column("extra", "String", "encrypted", "other attributes of the audit span, JSON"),
    Column("key_id", "UInt32", comment="data key of the encrypted columns"),
    *_CHAIN,
]

#: access_log: every read of the audit data through phiaudit, refused ones too.
ACCESS_LOG_COLUMNS: list[Column] = [
    Column("event_id", "UUID", codec="NONE"),
    Column("time", "DateTime64(6, 'UTC')"),
    Column("principal", "String"),
    Column("role", "LowCardinality(String)"),
    Column("interface", "LowCardinality(String)", comment="service | direct"),
    Column("statement", "String", "encrypted", "the query text (may carry PHI)"),
    Column("statement_bidx", "String", comment="blind index of the query text"),
    Column("decrypt", "Bool"),
    Column("rows_returned", "UInt64"),
    Column("outcome", "LowCardinality(String)", comment="ok | denied | error"),
    Column("reason", "String", comment="why refused or failed; never PHI"),
    Column("key_id", "UInt32"),
    *_CHAIN,
]

#: otel_traces: the OpenTelemetry Collector ClickHouse exporter's schema (Grafana reads it).
TRACE_COLUMNS: list[Column] = [
    Column("Timestamp", "DateTime64(9)"),
    Column("TraceId", "String"),
    Column("SpanId", "String"),
    Column("ParentSpanId", "String"),
    Column("TraceState", "String"),
    Column("SpanName", "LowCardinality(String)"),
    Column("SpanKind", "LowCardinality(String)"),
    Column("ServiceName", "LowCardinality(String)"),
    Column("ResourceAttributes", "Map(LowCardinality(String), String)"),
    Column("ScopeName", "String"),
    Column("ScopeVersion", "String"),
    Column("SpanAttributes", "Map(LowCardinality(String), String)"),
    Column("Duration", "UInt64"),
    Column("StatusCode", "LowCardinality(String)"),
    Column("StatusMessage", "String"),
    Column("Events.Timestamp", "Array(DateTime64(9))"),
    Column("Events.Name", "Array(LowCardinality(String))"),
    Column("Events.Attributes", "Array(Map(LowCardinality(String), String))"),
    Column("Links.TraceId", "Array(String)"),
    Column("Links.SpanId", "Array(String)"),
    Column("Links.TraceState", "Array(String)"),
    Column("Links.Attributes", "Array(Map(LowCardinality(String), String))"),
]

#: checkpoints: signed Merkle checkpoints of each writer's chain (see _checkpoint.py).
CHECKPOINT_COLUMNS: list[Column] = [
    Column("origin", "LowCardinality(String)", comment="phiaudit/<database>/<table>"),
    Column("writer_id", "LowCardinality(String)"),
    Column("tree_size", "UInt64", comment="rows 1..tree_size of the writer's chain"),
    Column("root_hash", "FixedString(32)", comment="RFC 6962 tree hash of their chain hashes"),
    Column("time", "DateTime64(6, 'UTC')"),
    Column("key_id", "LowCardinality(String)", comment="Ed25519 signing key id"),
    Column("signature", "String", comment="Ed25519 over the checkpoint body"),
]

#: legal_holds: a hold stops any purge of data in its time range until it is released.
HOLD_COLUMNS: list[Column] = [
    Column("hold_id", "String"),
    Column("action", "LowCardinality(String)", comment="place | release"),
    Column("start", "DateTime64(6, 'UTC')"),
    Column("end", "DateTime64(6, 'UTC')"),
    Column("reason", "String", comment="case reference; no PHI"),
    Column("principal", "String"),
    Column("time", "DateTime64(6, 'UTC')"),
]

#: infra_events: normalized infrastructure records (database audit logs, cloud access logs,
#: network flows, database client spans). Records that touch PHI (``phi_touch``, from the
#: configured PHI catalog) are always kept whole; the others may be rolled up.
INFRA_COLUMNS: list[Column] = [
    Column("event_id", "UUID", comment="deterministic: a re-sent record is stored once",
           codec="NONE"),
    Column("event_time", "DateTime64(6, 'UTC')",
           comment="when the infrastructure says it happened"),
    Column("received_time", "DateTime64(6, 'UTC')"),
    Column("source_kind", "LowCardinality(String)",
           comment="pgaudit | cloudtrail | vpcflow | db_span | unknown"),
    Column("parse_status", "LowCardinality(String)", comment="ok | unparsed"),
    Column("source", "LowCardinality(String)", comment="emitting service, host or log"),
    Column("actor_id", "String", comment="database role, cloud principal or service"),
    Column("client_address", "String", "encrypted"),
    Column("client_bidx", "String", comment="blind index of the client address"),
    Column("operation", "LowCardinality(String)", comment="SELECT, GetObject, ConsoleLogin, ..."),
    Column("object_type", "LowCardinality(String)", comment="table | object | endpoint | login"),
    Column("object", "String", "encrypted", "table, bucket/key or address:port"),
    Column("object_bidx", "String", comment="blind index of the object"),
    Column("phi_touch", "Bool", comment="the object is in the PHI catalog"),
    Column("phi_object", "LowCardinality(String)", comment="the catalog entry that matched"),
    Column("outcome", "LowCardinality(String)", comment="success | failure | unknown"),
    Column("record_count", "UInt64", comment="rows, objects or packets, when known"),
    Column("trace_id", "String", comment="hex; from sqlcommenter traceparent or the span"),
    Column("span_id", "String"),
    Column("sender", "LowCardinality(String)", comment="authenticated client identity"),
    Column("raw", "String", "encrypted", "the original record"),
    Column("key_id", "UInt32"),
    *_CHAIN,
]

#: infra_rollups: per-minute counts of the infrastructure records that touch no PHI.
ROLLUP_COLUMNS: list[Column] = [
    Column("minute", "DateTime64(6, 'UTC')"),
    Column("source_kind", "LowCardinality(String)"),
    Column("actor_id", "String"),
    Column("object_name", "String", comment="not in the PHI catalog, so stored in clear"),
    Column("operation", "LowCardinality(String)"),
    Column("outcome", "LowCardinality(String)"),
    Column("records", "UInt64", comment="records of this minute and key; sum() over rows"),
    Column("kept", "UInt64", comment="of them, sampled and kept whole in infra_events"),
    Column("raw_bytes", "UInt64",
           comment="size of the log records rolled up (database spans count 0)"),
]

#: alerts: raised by rules; deterministic ids (rule, group, window) deduplicate them.
ALERT_COLUMNS: list[Column] = [
    Column("alert_id", "UUID", comment="from rule, group key and window"),
    Column("time", "DateTime64(6, 'UTC')", comment="when it was raised"),
    Column("rule_id", "LowCardinality(String)"),
    Column("severity", "LowCardinality(String)"),
    Column("window_start", "DateTime64(6, 'UTC')"),
    Column("window_end", "DateTime64(6, 'UTC')"),
    Column("group_key", "String", comment="JSON of the group-by values (ids, blind indexes)"),
    Column("summary", "String", comment="for people; never PHI"),
    Column("value", "UInt64", comment="the count that crossed the threshold, when any"),
    Column("evidence", "Array(UUID)", comment="event ids (at most 100)"),
    Column("evidence_count", "UInt64"),
    Column("trace_ids", "Array(String)"),
    Column("mode", "LowCardinality(String)", comment="scheduled | backfill"),
    *_CHAIN,
]

#: care_relationships: who may see whom, and when (the `lookup` of the care rule).
CARE_COLUMNS: list[Column] = [
    Column("actor_id", "String", comment="the user id the application reports"),
    Column("patient_bidx", "String", comment="blind index of the patient id"),
    Column("start", "DateTime64(6, 'UTC')"),
    Column("end", "DateTime64(6, 'UTC')"),
    Column("relationship", "LowCardinality(String)", comment="encounter | careteam | ..."),
    Column("batch_id", "String", comment="one `phiaudit care load`"),
    Column("loaded_time", "DateTime64(6, 'UTC')"),
    Column("loaded_by", "String"),
]

#: rule_runs: each evaluation of a rule; max(window_to) per rule is its watermark.
RULE_RUN_COLUMNS: list[Column] = [
    Column("rule_id", "LowCardinality(String)"),
    Column("mode", "LowCardinality(String)", comment="scheduled | backfill"),
    Column("window_from", "DateTime64(6, 'UTC')"),
    Column("window_to", "DateTime64(6, 'UTC')"),
    Column("time", "DateTime64(6, 'UTC')"),
    Column("alerts", "UInt64"),
    Column("duration_us", "UInt64"),
    Column("rule_hash", "String", comment="SHA-256 of the compiled rule"),
]

#: alert_deliveries: each attempt to deliver an alert to a sink.
DELIVERY_COLUMNS: list[Column] = [
    Column("alert_id", "UUID"),
    Column("sink", "LowCardinality(String)"),
    Column("attempt", "UInt32"),
    Column("outcome", "LowCardinality(String)", comment="delivered | failed"),
    Column("time", "DateTime64(6, 'UTC')"),
    Column("error", "String", comment="kind of failure; never PHI"),
]

ENCRYPTED_COLUMNS: dict[str, frozenset[str]] = {
    "audit_events": frozenset(c.name for c in AUDIT_COLUMNS if c.kind == "encrypted"),
    "access_log": frozenset(c.name for c in ACCESS_LOG_COLUMNS if c.kind == "encrypted"),
    "infra_events": frozenset(c.name for c in INFRA_COLUMNS if c.kind == "encrypted"),
}


def _cols(columns: list[Column]) -> str:
    out = []
    for c in columns:
        name = f"`{c.name}`"
        text = c.comment.replace("\\", "\\\\").replace("'", "\\'")
        comment = f" COMMENT '{text}'" if c.comment else ""
        codec = f" CODEC({c.stored_codec})" if c.stored_codec else ""
        out.append(f"    {name} {c.type}{codec}{comment}")
    return ",\n".join(out)


#: merge_selector_base 64 (default 5): fewer, wider merges (rows are rewritten less often; an
#: audit table is written far more than it is read): ~10% less of the service's CPU per span
#: than base 16 at bench/receiver.py's load, for more parts waiting to merge (18 against 10
#: after a 25 s run; queries measured the same); compact parts up to 256 MiB: cheaper small
#: parts and merges, and less memory. At most 16 parts a merge (default 100): merging into a
#: compact part is always horizontal, and its memory grows with the rows merged (30 parts of
#: 3,000 audit rows: 120 MiB; 10 such parts: 57 MiB; bench/README.md, session 10); with the
#: group commit's ~3,000-row parts and base 64 the engine merged 20-31 at once, two merges at a
#: time, and the service's peak RSS passed 1 GiB at ~90k spans/s. Measured at that load: peak
#: RSS 970-983 MiB against 1,035-1,082, the same CPU per span
_MERGE_TUNING = ("merge_selector_base = 64, min_bytes_for_wide_part = 268435456, "
                 "max_parts_to_merge_at_once = 16")
#: an acknowledged insert is on the disk, not only in the page cache: the engine fsyncs a new
#: part's files before the insert returns (``fsync_after_insert``; default off), and the
#: embedded store then syncs the part's directory and the table's (``Store._sync_parts``:
#: ``fsync_part_directory`` fails on the encrypted disk, error 107 with chdb-core 26.9), so a
#: power loss or a kernel crash after the acknowledgement loses nothing (a killed process never
#: did: tests/e2e/test_crash.py). ~10 file syncs an insert, paid once per group commit
#: (bench/README.md, session 13). A server's operator sets ``fsync_part_directory`` in its
#: ``merge_tree`` configuration
_DURABILITY = "fsync_after_insert = 1"
#: a granule (the rows a merge reads from each of its parts at a time) holds at most 2 MiB
#: (default 10 MiB). A merge into a compact part is horizontal: it holds one granule of every
#: part it merges, and late in a 600 s bench run (parts of 8,192-row granules, ~10 MiB of
#: audit rows each) merges of 12-16 parts used 150-200 MiB each, the largest part of the
#: service's peaks. With 2 MiB, merges used at most 172 MiB together instead of 266 and the run
#: peaked at 793 MiB against 855-947 (bench/README.md, session 14). Fixed when a table is made
#: (a read-only MergeTree setting): stores made before keep 10 MiB
_GRANULES = "index_granularity = 8192, index_granularity_bytes = 2097152"
_BASE_SETTINGS = ("SETTINGS non_replicated_deduplication_window = 10000, " + _GRANULES + ", "
                  + _MERGE_TUNING + ", " + _DURABILITY)

#: the tables created with ``_cols`` and the merge settings, for upgrading older stores
_TUNED_TABLES: dict[str, list[Column]] = {
    "audit_events": AUDIT_COLUMNS, "access_log": ACCESS_LOG_COLUMNS,
    "otel_traces": TRACE_COLUMNS, "checkpoints": CHECKPOINT_COLUMNS,
    "legal_holds": HOLD_COLUMNS, "infra_events": INFRA_COLUMNS,
    "infra_rollups": ROLLUP_COLUMNS, "alerts": ALERT_COLUMNS, "care_relationships": CARE_COLUMNS,
    "rule_runs": RULE_RUN_COLUMNS, "alert_deliveries": DELIVERY_COLUMNS,
}


def _tuning_statements(db: str) -> list[str]:
    out = []
    for table, columns in _TUNED_TABLES.items():
        changes = [f"MODIFY COLUMN `{c.name}` CODEC({c.stored_codec})"
                   for c in columns if c.stored_codec]
        changes.append(f"MODIFY SETTING {_MERGE_TUNING}, {_DURABILITY}")
        out.append(f"ALTER TABLE `{db}`.{table} " + ", ".join(changes))
    return out


def migration_statements(db: str, storage_policy: str | None = None) -> list[str]:
    """Idempotent DDL that brings database ``db`` to SCHEMA_VERSION; new tables go on
    ``storage_policy`` when given (the embedded store's encrypted disk)."""
    if not db.replace("_", "").isalnum():
        raise ValueError("database name must be alphanumeric")
    if storage_policy is not None and not storage_policy.replace("_", "").isalnum():
        raise ValueError("storage policy name must be alphanumeric")
    policy = f", storage_policy = '{storage_policy}'" if storage_policy else ""
    plain = f"SETTINGS storage_policy = '{storage_policy}'" if storage_policy else ""
    merge_settings = _BASE_SETTINGS + policy
    return [
        f"CREATE DATABASE IF NOT EXISTS `{db}`",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.audit_events (
{_cols(AUDIT_COLUMNS)},
    INDEX idx_patient patient_bidx TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_actor actor_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_event event_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_time event_time TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (writer_id, seq)
{merge_settings}
COMMENT 'PHI audit events: append-only, encrypted PHI, hash-chained per writer, no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.access_log (
{_cols(ACCESS_LOG_COLUMNS)},
    INDEX idx_time time TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (writer_id, seq)
{merge_settings}
COMMENT 'every read of the audit trail through phiaudit: append-only, no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.otel_traces (
{_cols(TRACE_COLUMNS)},
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
{merge_settings}""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.otel_traces_trace_id_ts (
    TraceId String,
    Start DateTime,
    End DateTime,
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
{plain}""",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS `{db}`.otel_traces_trace_id_ts_mv
TO `{db}`.otel_traces_trace_id_ts AS
SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM `{db}`.otel_traces WHERE TraceId != '' GROUP BY TraceId""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.checkpoints (
{_cols(CHECKPOINT_COLUMNS)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (origin, writer_id, tree_size, time)
{merge_settings}
COMMENT 'signed Merkle checkpoints of the hash chains: append-only, no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.legal_holds (
{_cols(HOLD_COLUMNS)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (hold_id, time)
{merge_settings}
COMMENT 'legal holds: placing and releasing are both appended; no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.infra_events (
{_cols(INFRA_COLUMNS)},
    INDEX idx_trace trace_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_event event_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_time event_time TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (writer_id, seq)
{merge_settings}
COMMENT 'infrastructure records: append-only, encrypted raw record, hash-chained, no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.infra_rollups (
{_cols(ROLLUP_COLUMNS)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (source_kind, minute, actor_id, object_name)
{merge_settings}
COMMENT 'per-minute counts of infrastructure records that touch no PHI: append-only, no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.alerts (
{_cols(ALERT_COLUMNS)},
    INDEX idx_time time TYPE minmax GRANULARITY 1,
    INDEX idx_alert alert_id TYPE bloom_filter(0.01) GRANULARITY 4
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (writer_id, seq)
{merge_settings}
COMMENT 'alerts raised by rules: append-only, hash-chained, no TTL'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.care_relationships (
{_cols(CARE_COLUMNS)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(loaded_time)
ORDER BY (actor_id, patient_bidx, start)
{merge_settings}
COMMENT 'care relationships (practitioner, patient blind index, period): append-only'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.rule_runs (
{_cols(RULE_RUN_COLUMNS)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (rule_id, window_to)
{merge_settings}
COMMENT 'rule evaluations and their watermarks: append-only'""",
        f"""CREATE TABLE IF NOT EXISTS `{db}`.alert_deliveries (
{_cols(DELIVERY_COLUMNS)}
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (alert_id, sink, time)
{merge_settings}
COMMENT 'alert delivery attempts: append-only'""",
        # schema 1 stores: the time skip indexes the rules need (rows arrive in time order,
        # so a minmax index prunes nearly every granule outside a rule's window)
        f"ALTER TABLE `{db}`.audit_events ADD INDEX IF NOT EXISTS idx_time event_time "
        "TYPE minmax GRANULARITY 1",
        f"ALTER TABLE `{db}`.access_log ADD INDEX IF NOT EXISTS idx_time time "
        "TYPE minmax GRANULARITY 1",
        # stores made before the codecs and merge settings (metadata only: no data rewritten;
        # new parts and merges use them)
        *_tuning_statements(db),
        f"""CREATE TABLE IF NOT EXISTS `{db}`.schema_migrations (
    version UInt32, applied DateTime64(6, 'UTC') DEFAULT now64(6)
) ENGINE = MergeTree ORDER BY version
{plain}""",
    ]
