-- phiaudit on a ClickHouse server: database, roles, settings profiles and users.
--
-- Run once as the administrator defined in users.d/phiaudit.xml (phiaudit_admin), over TLS:
--   clickhouse-client --secure --host ch1.internal --port 9440 --user phiaudit_admin \
--       --ask-password --multiquery < deploy/clickhouse/phiaudit.sql
-- then create the tables: either `phiaudit serve --clickhouse https://phiaudit_admin:...@...`
-- once (single server: the service runs its migrations) or, on a cluster,
-- deploy/clickhouse/cluster.sql. Afterwards the service runs as phiaudit_svc, which can
-- only INSERT and SELECT.
--
-- On a cluster, add ON CLUSTER 'phiaudit' after each name below, or keep users and roles in
-- a replicated access storage (<user_directories><replicated>) so that they exist everywhere.
--
-- Replace the two __SHA256_HEX_OF_..._PASSWORD__ placeholders before running (the statements
-- fail on purpose until then):   echo -n "$PASSWORD" | sha256sum | cut -d' ' -f1
-- Never commit a real password or hash; this file is a template.

CREATE DATABASE IF NOT EXISTS phiaudit;

-- Guard rails for every phiaudit user, pinned with CONST so that no session can lift them.
-- max_table_size_to_drop / max_partition_size_to_drop: 1 byte, i.e. no non-empty table or
-- partition can be dropped or truncated. NOT 0: in ClickHouse 0 means "no limit".
-- (They are query-level settings since ClickHouse 23.12, so the server-level values in
-- config.d/phiaudit.xml alone are not enough.) The grants below already deny DROP, TRUNCATE,
-- ALTER ... DELETE/UPDATE and OPTIMIZE; these are the second lock.
CREATE SETTINGS PROFILE IF NOT EXISTS phiaudit_guard SETTINGS
    max_table_size_to_drop = 1 CONST,
    max_partition_size_to_drop = 1 CONST,
    allow_ddl = 0 CONST,
    allow_introspection_functions = 0 CONST;

-- The service: synchronous inserts, acknowledged only once durable. On a cluster the inserts
-- go through Distributed tables: foreground inserts, and a quorum of replicas per shard.
CREATE SETTINGS PROFILE IF NOT EXISTS phiaudit_writer_profile SETTINGS
    INHERIT 'phiaudit_guard',
    async_insert = 0,
    distributed_foreground_insert = 1 CONST,
    insert_quorum = 'auto',
    insert_quorum_parallel = 1;

-- People and tools that read (Grafana, notebooks): read-only, bounded queries.
CREATE SETTINGS PROFILE IF NOT EXISTS phiaudit_reader_profile SETTINGS
    INHERIT 'phiaudit_guard',
    readonly = 2,
    max_execution_time = 300,
    max_result_rows = 1000000;

-- Roles: the writer may INSERT and SELECT, nothing else; the reader may SELECT.
CREATE ROLE IF NOT EXISTS phiaudit_writer SETTINGS PROFILE 'phiaudit_writer_profile';
GRANT INSERT, SELECT ON phiaudit.* TO phiaudit_writer;

CREATE ROLE IF NOT EXISTS phiaudit_reader SETTINGS PROFILE 'phiaudit_reader_profile';
GRANT SELECT ON phiaudit.* TO phiaudit_reader;

-- Users. The server only listens on TLS ports (config.d/phiaudit.xml: https_port and
-- tcp_port_secure, no plaintext port), so every user connects over TLS; HOST restricts where
-- from (the equivalent of <networks> for SQL-defined users).
--
-- The receivers (phiaudit serve --clickhouse https://phiaudit_svc:...@ch:8443/phiaudit).
CREATE USER IF NOT EXISTS phiaudit_svc
    IDENTIFIED WITH sha256_hash BY '__SHA256_HEX_OF_PHIAUDIT_SVC_PASSWORD__'
    HOST IP '10.20.0.0/16'
    DEFAULT ROLE phiaudit_writer
    DEFAULT DATABASE phiaudit;
GRANT phiaudit_writer TO phiaudit_svc;

-- A dashboard (Grafana's ClickHouse data source): otel_traces, and audit_events ciphertext.
-- Reads made directly in ClickHouse bypass phiaudit's access_log; they are in ClickHouse's
-- system.query_log, which must then be kept (and reviewed) like the audit trail itself.
-- Investigators should use `phiaudit sql`, which records every read in access_log.
CREATE USER IF NOT EXISTS phiaudit_grafana
    IDENTIFIED WITH sha256_hash BY '__SHA256_HEX_OF_GRAFANA_PASSWORD__'
    HOST IP '10.30.0.0/16'
    DEFAULT ROLE phiaudit_reader
    DEFAULT DATABASE phiaudit;
GRANT phiaudit_reader TO phiaudit_grafana;

-- Alternative without passwords: authenticate the receivers by their client certificate
-- (the server's openSSL.server.verificationMode must then be relaxed or strict):
--   CREATE USER phiaudit_svc IDENTIFIED WITH ssl_certificate CN 'phiaudit-receiver'
--       HOST IP '10.20.0.0/16' DEFAULT ROLE phiaudit_writer;
