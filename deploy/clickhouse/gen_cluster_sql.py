"""Generate ``deploy/clickhouse/cluster.sql`` from the schema module, so it cannot drift.

    .venv/bin/python deploy/clickhouse/gen_cluster_sql.py [--cluster NAME] [--database DB]
                                                         [--check] [--output FILE]

It takes ``phiaudit.storage.migration_statements()`` (the DDL the embedded store runs) and
rewrites every table for a ClickHouse cluster:

* ``<table>_local``: ``ReplicatedMergeTree`` ``ON CLUSTER``, same columns, indexes, partition
  key, ordering and comment; ``non_replicated_deduplication_window`` becomes
  ``replicated_deduplication_window`` (the idempotent retries rely on it);
* ``<table>``: a ``Distributed`` table over the local ones, with the same name the service
  queries and inserts into. Chained tables are sharded by ``writer_id``, so that each writer's
  hash chain lives on one shard and can be verified there;
* the materialized view reads and writes the local tables;
* ``--storage-policy`` puts the local tables on an encrypted-disk policy.

Still plain (Replicated)MergeTree, never Replacing/Collapsing, and no TTL (ARCHITECTURE.md).
``--check`` exits 1 when the committed file differs from what the schema generates (for CI).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from phiaudit.storage import SCHEMA_VERSION, migration_statements

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "cluster.sql"

#: Distributed sharding keys. A writer's chain must stay on one shard.
SHARDING = {
    "audit_events": "cityHash64(writer_id)",
    "access_log": "cityHash64(writer_id)",
    "otel_traces": "cityHash64(TraceId)",
    "otel_traces_trace_id_ts": "cityHash64(TraceId)",
    "infra_events": "cityHash64(writer_id)",
    "alerts": "cityHash64(writer_id)",
    "infra_rollups": "rand()",
    "care_relationships": "cityHash64(actor_id)",
    "rule_runs": "cityHash64(rule_id)",
    "alert_deliveries": "cityHash64(alert_id)",
}

_CREATE_DB = re.compile(r"^CREATE DATABASE IF NOT EXISTS `(?P<db>\w+)`$")
_CREATE_TABLE = re.compile(
    r"^CREATE TABLE IF NOT EXISTS `(?P<db>\w+)`\.(?P<name>\w+) \((?P<body>.*)\) "
    r"ENGINE = MergeTree(?P<rest>.*)$", re.S)
_ALTER = re.compile(r"^ALTER TABLE `(?P<db>\w+)`\.(?P<name>\w+) "
                    r"(?P<rest>(?:ADD INDEX|MODIFY COLUMN|MODIFY SETTING) .*)$", re.S)
_CREATE_MV = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS `(?P<db>\w+)`\.(?P<name>\w+)\s+"
    r"TO `(?P=db)`\.(?P<target>\w+) AS(?P<select>.*)$", re.S)


def _replicated_settings(rest: str, storage_policy: str) -> str:
    rest = rest.replace("non_replicated_deduplication_window", "replicated_deduplication_window")
    if storage_policy:
        policy = f"storage_policy = '{storage_policy}'"
        if "\nSETTINGS " in rest:
            rest = rest.replace("\nSETTINGS ", f"\nSETTINGS {policy}, ", 1)
        elif "\nCOMMENT " in rest:
            rest = rest.replace("\nCOMMENT ", f"\nSETTINGS {policy}\nCOMMENT ", 1)
        else:
            rest = rest + f"\nSETTINGS {policy}"
    return rest


def cluster_statements(cluster: str, database: str, storage_policy: str = "") -> list[str]:
    """The cluster DDL for ``database`` on ``cluster``."""
    on = f"ON CLUSTER '{cluster}'"
    out: list[str] = []
    local_names: set[str] = set()
    for stmt in migration_statements(database):
        stmt = stmt.strip()
        if m := _CREATE_DB.match(stmt):
            out.append(f"CREATE DATABASE IF NOT EXISTS `{m['db']}` {on}")
        elif m := _CREATE_TABLE.match(stmt):
            db, name = m["db"], m["name"]
            local = f"{name}_local"
            local_names.add(name)
            engine = (f"ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{db}/{local}', "
                      "'{replica}')")
            out.append(f"CREATE TABLE IF NOT EXISTS `{db}`.{local} {on} ({m['body']}) "
                       f"ENGINE = {engine}{_replicated_settings(m['rest'], storage_policy)}")
            key = SHARDING.get(name, "rand()")
            out.append(f"CREATE TABLE IF NOT EXISTS `{db}`.{name} {on}\n"
                       f"AS `{db}`.{local}\n"
                       f"ENGINE = Distributed('{cluster}', '{db}', '{local}', {key})")
        elif m := _ALTER.match(stmt):
            # the index, codecs and settings are in the CREATE already: this upgrades
            # clusters made before them
            out.append(f"ALTER TABLE `{m['db']}`.{m['name']}_local {on} {m['rest']}")
        elif m := _CREATE_MV.match(stmt):
            db, select = m["db"], m["select"]
            for table in local_names:
                select = re.sub(rf"`{db}`\.{table}\b", f"`{db}`.{table}_local", select)
            out.append(f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{db}`.{m['name']}_local {on}\n"
                       f"TO `{db}`.{m['target']}_local AS{select}")
        else:
            raise SystemExit(f"gen_cluster_sql: unrecognised migration statement:\n{stmt[:200]}")
    return out


def render(cluster: str, database: str, storage_policy: str = "") -> str:
    head = f"""-- phiaudit on a ClickHouse cluster: ReplicatedMergeTree + Distributed, ON CLUSTER.
--
-- GENERATED by deploy/clickhouse/gen_cluster_sql.py from phiaudit.storage (schema version
-- {SCHEMA_VERSION}); do not edit by hand: change the schema module and regenerate.
--
-- Run once, as an administrator (not as phiaudit_writer), after deploy/clickhouse/phiaudit.sql:
--   clickhouse-client --secure --multiquery < deploy/clickhouse/cluster.sql
--
-- The service inserts into the Distributed tables. Its settings profile (phiaudit.sql) sets
-- distributed_foreground_insert = 1 and insert_quorum = 'auto': an INSERT returns only when
-- the rows are on a majority of the replicas of their shard, so "acknowledged after commit"
-- still holds. Without that, a Distributed insert is queued locally and acknowledged early.
"""
    body = ";\n\n".join(cluster_statements(cluster, database, storage_policy)) + ";\n"
    return head + "\n" + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", default="phiaudit", help="cluster name (remote_servers)")
    p.add_argument("--database", default="phiaudit")
    p.add_argument("--storage-policy", default="",
                   help="put the local tables on this storage policy (e.g. phiaudit_encrypted "
                        "from config.d/phiaudit.xml: an AES_256_CTR encrypted disk)")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    p.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = p.parse_args(argv)
    text = render(args.cluster, args.database, args.storage_policy)
    out = Path(args.output)
    if args.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(f"{out} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
