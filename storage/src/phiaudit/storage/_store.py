"""The ClickHouse store: embedded (chDB in process) or a server, through clickhouse-connect.

Embedded mode opens the engine twice, in two processes, never at once:

1. ``migrate()`` runs the schema migrations in a short-lived child process whose engine has the
   default (administrator) configuration;
2. ``Store.open()`` then opens the engine in this process with a restricted ``users_config``:
   the only user may SELECT and INSERT on the phiaudit database, and nothing else. Every
   ALTER ... DELETE/UPDATE, DELETE FROM, TRUNCATE, DROP, OPTIMIZE, RENAME, DETACH and every
   file/url table function is refused by ClickHouse itself (ACCESS_DENIED).

One engine per process and per data directory (FACTS.md): the service owns it; other
processes go through the service.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from ._durable import fsync_dir
from ._errors import ConfigError, MemoryLimitExceeded, PermanentError, StorageUnavailable
from ._schema import SCHEMA_VERSION, Column, migration_statements

__all__ = [
    "ENCRYPTED_POLICY",
    "Store",
    "StoreLocation",
    "admin_client",
    "disk_key_env",
    "migrate",
    "write_engine_config",
]

_log = logging.getLogger("phiaudit.storage")

_USERS_XML = """<clickhouse>
  <profiles>
    <default>
      <!-- 0 would mean "no limit": 1 byte refuses every drop; the constraints pin them -->
      <max_table_size_to_drop>1</max_table_size_to_drop>
      <max_partition_size_to_drop>1</max_partition_size_to_drop>
      <allow_ddl>0</allow_ddl>
      <allow_introspection_functions>0</allow_introspection_functions>
      <constraints>
        <max_table_size_to_drop><const/></max_table_size_to_drop>
        <max_partition_size_to_drop><const/></max_partition_size_to_drop>
        <allow_ddl><const/></allow_ddl>
        <allow_introspection_functions><const/></allow_introspection_functions>
      </constraints>
    </default>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>::/0</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
      <access_management>0</access_management>
      <grants>
        <query>GRANT SELECT, INSERT ON {db}.*</query>
        <!-- SYSTEM JEMALLOC PURGE only touches the allocator: Store.release_memory -->
        <query>GRANT SYSTEM JEMALLOC ON *.*</query>
      </grants>
    </default>
  </users>
  <quotas><default></default></quotas>
</clickhouse>
"""

_CONFIG_XML = """<clickhouse>
{users}  <logger><level>error</level><console>0</console></logger>
  <os_threads_nice_value_merge_mutate>19</os_threads_nice_value_merge_mutate>
  <merges_mutations_memory_usage_soft_limit>{merge_memory}</merges_mutations_memory_usage_soft_limit>
  <storage_configuration>
    <disks>
      <phiaudit_plain><type>local</type><path>{plain}/</path></phiaudit_plain>
      <phiaudit_encrypted>
        <type>encrypted</type>
        <disk>phiaudit_plain</disk>
        <path>encrypted/</path>
        <algorithm>AES_256_CTR</algorithm>
        <key_hex id="1" from_env="{env}"/>
        <current_key_id>1</current_key_id>
      </phiaudit_encrypted>
    </disks>
    <policies>
      <phiaudit_encrypted><volumes><main><disk>phiaudit_encrypted</disk></main></volumes>
      </phiaudit_encrypted>
    </policies>
  </storage_configuration>
</clickhouse>
"""

# Merges run at nice 19: they are background work, and on a small machine they otherwise
# take a core from the extraction and the insert that an acknowledgement waits for (measured
# in bench/README.md: a group commit's insert 50 -> 36 ms median, p99 acknowledgement lower).
# They still get every idle moment; should they fall behind, ClickHouse delays inserts
# (parts_to_delay_insert) and acknowledgements slow down with them: back-pressure, not loss.

#: The storage policy of the embedded store's tables: an AES-256-CTR encrypted disk.
ENCRYPTED_POLICY = "phiaudit_encrypted"
_DISK_ENV_PREFIX = "PHIAUDIT_DISK_KEY_"


def _disk_env_name(data_dir: Path) -> str:
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return _DISK_ENV_PREFIX + digest.upper()


def disk_key_env(data_dir: Path) -> dict[str, str]:
    """The encrypted disk's key, from the key ring, as the engine reads it (an environment
    variable named after the data directory). Never written to a file in clear."""
    from ._crypto import KeyRing

    key = KeyRing.open(Path(data_dir)).disk_key()
    return {_disk_env_name(data_dir): key.hex()}


#: merges together may use this much memory before the engine starts another (one already
#: running goes on): each holds 70-160 MiB (bench/README.md, session 10), and on 2 cores up
#: to four ran at once beside the ingestion and a rule run (session 11)
MERGE_MEMORY_BYTES = 128 << 20


def write_engine_config(data_dir: Path, database: str, *, restricted: bool) -> Path:
    """The engine's configuration: the encrypted disk always; for the service's own engine
    also the restricted user (SELECT and INSERT only)."""
    data_dir = Path(data_dir).resolve()
    cfg_dir = data_dir / "config"
    cfg_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    plain = data_dir / "clickhouse-disks" / "plain"
    plain.mkdir(parents=True, exist_ok=True, mode=0o700)
    users = ""
    if restricted:
        users_file = cfg_dir / "users.xml"
        users_file.write_text(_USERS_XML.format(db=database))
        users = f"  <users_config>{users_file}</users_config>\n"
    config = cfg_dir / ("config.xml" if restricted else "admin.xml")
    config.write_text(_CONFIG_XML.format(users=users, plain=plain,
                                         env=_disk_env_name(data_dir),
                                         merge_memory=MERGE_MEMORY_BYTES))
    return config


def admin_client(data_dir: Path, database: str = "phiaudit") -> Any:
    """An unrestricted embedded engine over ``data_dir`` (migrations, purges, and tools that
    must be able to alter data, such as tamper tests). Needs the key-encryption key."""
    data_dir = Path(data_dir).resolve()
    os.environ.update(disk_key_env(data_dir))
    return open_admin_engine(data_dir, database)


def open_admin_engine(data_dir: Path, database: str) -> Any:
    """The unrestricted engine, for a process whose environment already holds the disk key
    (the migration and purge child processes get it from their parent)."""
    import clickhouse_connect

    data_dir = Path(data_dir).resolve()
    config = write_engine_config(data_dir, database, restricted=False)
    (data_dir / "clickhouse").mkdir(parents=True, exist_ok=True, mode=0o700)
    return clickhouse_connect.get_client(dsn=f"chdb://{data_dir / 'clickhouse'}",
                                         chdb_options={"config-file": str(config)})


@dataclass(frozen=True)
class StoreLocation:
    """Where the data lives: an embedded data directory or a ClickHouse server URL."""

    data_dir: Path | None = None
    url: str | None = None
    database: str = "phiaudit"
    #: PEM file of the CA(s) that sign the ClickHouse server's certificate (https only);
    #: default ``$PHIAUDIT_CLICKHOUSE_CA_FILE``, else the system / certifi roots
    ca_file: str | None = None
    #: embedded only: new tables on an AES-256-CTR encrypted disk keyed from the key ring
    disk_encryption: bool = True

    def __repr__(self) -> str:
        return (f"StoreLocation(data_dir={self.data_dir!r}, url={_redact_url(self.url)!r}, "
                f"ca_file={self.ca_file!r})")

    @property
    def embedded(self) -> bool:
        return self.url is None


def _redact_url(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":[REDACTED]@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _map_error(exc: BaseException, what: str) -> Exception:
    """ClickHouse errors at the boundary: never pass server text through (it may echo data)."""
    text = str(exc)
    code = ""
    if "Code: " in text:
        code = text.split("Code: ", 1)[1].split(".", 1)[0].strip()
    name = ""
    if "(" in text and text.rstrip().endswith(")"):
        name = text.rstrip().rsplit("(", 1)[1].rstrip(")").strip()
    label = f"ClickHouse error {code} {name}".strip() if code else type(exc).__name__
    # Transient by nature: time-outs, network, memory, too many parts/queries, disk, keeper.
    transient = {"159", "209", "210", "241", "202", "252", "243", "425", "1000", "999", "242",
                 "3", "74", "75", "76", "236", "394"}
    if code and code not in transient:
        return PermanentError(f"{what}: {label}")
    if code == "241":
        return MemoryLimitExceeded(f"{what}: {label}: it needs more memory than it may use")
    return StorageUnavailable(f"{what}: {label}")


def migrate(location: StoreLocation) -> None:
    """Create or upgrade the schema. Embedded: in a child process with the admin engine."""
    if location.embedded:
        assert location.data_dir is not None
        env = dict(os.environ)
        env.update(disk_key_env(location.data_dir))
        proc = subprocess.run(  # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, "-m", "phiaudit.storage._migrate", str(location.data_dir),
             location.database, ENCRYPTED_POLICY if location.disk_encryption else ""],
            capture_output=True, text=True, timeout=300, check=False, env=env,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise StorageUnavailable(f"schema migration failed: {last[:300]}")
        return
    client = _server_client(location)
    try:
        for stmt in migration_statements(location.database):
            client.command(stmt)
        done = client.query(f"SELECT count() FROM `{location.database}`.schema_migrations "
                            "WHERE version = {v:UInt32}", parameters={"v": SCHEMA_VERSION})
        if not done.result_rows[0][0]:
            client.insert(f"{location.database}.schema_migrations", [[SCHEMA_VERSION]],
                          column_names=["version"])
    except Exception as exc:
        raise _map_error(exc, "schema migration") from exc


def _server_client(location: StoreLocation) -> Any:
    import clickhouse_connect

    assert location.url is not None
    parts = urlsplit(location.url)
    if parts.scheme not in ("https", "http"):
        raise ConfigError("clickhouse: the URL must be https://user:pass@host:port/database")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("clickhouse: plain http is allowed only on loopback; use https")
    db = parts.path.strip("/") or location.database
    ca_file = location.ca_file or os.environ.get("PHIAUDIT_CLICKHOUSE_CA_FILE") or None
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError("clickhouse_ca_file: no such file")
    tls: dict[str, Any] = {}
    if parts.scheme == "https" and ca_file:
        tls["ca_cert"] = str(Path(ca_file).resolve())
    try:
        # https: the certificate and the host name are always verified (never verify=False)
        return clickhouse_connect.get_client(
            host=parts.hostname, port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "default"), password=unquote(parts.password or ""),
            database=db, secure=parts.scheme == "https", verify=True, **tls,
        )
    except Exception as exc:
        raise _map_error(exc, "connect") from exc


def _period(v: int, per_us: float, month: bool) -> tuple[int, ...]:
    """The UTC month (or day) of a time stored as ``v`` units of ``per_us`` microseconds."""
    t = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=v * per_us)
    return (t.year, t.month) if month else (t.year, t.month, t.day)


class Store:
    """A connection that may only INSERT and SELECT. Thread-safe: calls are serialized (the
    embedded store's streaming inserts among themselves, on their own connection)."""

    def __init__(self, client: Any, location: StoreLocation, engine: Any = None) -> None:
        self._client = client
        #: embedded only: a handle on the same chDB engine, for streaming inserts (no file)
        self._engine = engine
        #: embedded only: (Arrow table, ClickHouse types of its columns) -> one block of the
        #: Native format, or None; inserts given the types send it instead of an Arrow stream
        #: (the receiver's compiled ``native_block``: less parsing in the engine)
        self.block_encoder: Callable[[Any, list[str]], bytes | None] | None = None
        self.location = location
        self.database = location.database
        self._lock = threading.Lock()
        #: the streaming inserts' own connection has its own lock: a long query (a checkpoint
        #: folds 100,000 rows, ~30-270 ms here) no longer holds up the insert that
        #: acknowledgements wait for (9% of the group commits waited for one, measured)
        self._insert_lock = threading.Lock()
        #: embedded only: per table, its data directories and partition key
        self._layouts: dict[str, tuple[list[Path], str]] = {}
        self._closed = False

    @classmethod
    def open(cls, location: StoreLocation) -> Store:
        if location.embedded:
            import clickhouse_connect

            assert location.data_dir is not None
            data_dir = Path(location.data_dir).resolve()
            config = write_engine_config(data_dir, location.database, restricted=True)
            env = disk_key_env(data_dir)
            os.environ.update(env)
            try:
                client = clickhouse_connect.get_client(
                    dsn=f"chdb://{data_dir / 'clickhouse'}",
                    chdb_options={"config-file": str(config)},
                    database=location.database,
                )
                import chdb

                # a second handle on the same engine (same path and configuration, so the
                # same restricted user): inserts stream Arrow to it from memory, where
                # clickhouse-connect's chDB backend writes every insert to a temporary file
                engine = chdb.connect(f"{os.path.realpath(data_dir / 'clickhouse')}?"
                                      + urlencode({"config-file": str(config)}))
            except Exception as exc:
                raise _map_error(exc, "open the embedded store") from exc
            finally:
                # the engine has read the key; processes started later do not inherit it
                for name in env:
                    os.environ.pop(name, None)
            return cls(client, location, engine)
        return cls(_server_client(location), location)

    def insert(
        self, table: str, columns: Sequence[str], data: Sequence[Sequence[Any]], token: str,
    ) -> None:
        """Insert column-oriented ``data``; idempotent per ``token`` (deduplication window)."""
        settings = {"insert_deduplication_token": token, "async_insert": 0}
        try:
            with self._lock:
                self._client.insert(
                    table, data, column_names=list(columns), column_oriented=True,
                    database=self.database, settings=settings,
                )
        except Exception as exc:
            raise _map_error(exc, f"insert into {table}") from exc

    def insert_rows(
        self, table: str, columns: Sequence[Column], rows: Sequence[Sequence[Any]], token: str,
    ) -> bool:
        """Insert row-oriented ``rows`` as one Arrow block; idempotent per ``token``. Returns
        ``insert_arrow``'s answer."""
        from ._arrow import arrow_table

        try:
            data = arrow_table(columns, rows)
        except (ValueError, TypeError, OverflowError) as exc:
            raise PermanentError(f"insert into {table}: a value does not fit its column") from exc
        return self.insert_arrow(table, data, token, types=[c.type for c in columns])

    def insert_arrow(self, table: str, data: Any, token: str,
                     types: list[str] | None = None) -> bool:
        """Insert an Arrow table (a batch, or a spooled block); idempotent per ``token``.
        ``types``, the ClickHouse types of its columns, lets the embedded store send it in
        the Native format (``block_encoder``).

        Returns False when the insert may not have written its rows: only from the embedded
        engine, whose streaming insert returns without an error when the part it writes
        fails (a full disk, a violated constraint: measured with chdb-core 26.9,
        bench/README.md session 9), seen as no new part for every partition of ``data``.
        An insert ClickHouse dropped as a duplicate of its ``token`` looks the same there
        (a server answers True for it), so the caller decides, knowing whether the rows may
        be stored already (``chain_rows`` says it exactly for a chained table)."""
        if self._engine is not None:
            return self._stream_insert(table, data, token, types)
        settings = {"insert_deduplication_token": token, "async_insert": 0}
        try:
            with self._lock:
                self._client.insert_arrow(table, data, database=self.database,
                                          settings=settings)
        except Exception as exc:
            raise _map_error(exc, f"insert into {table}") from exc
        return True

    def _table_layout(self, table: str) -> tuple[list[Path], str]:
        """The embedded table's data directories and partition key (cached; under
        ``_insert_lock``; ``table`` and the database are checked alphanumeric)."""
        got = self._layouts.get(table)
        if got is None:
            assert self._engine is not None
            if not (self.database + table).replace("_", "").isalnum():
                raise ValueError("database and table names must be alphanumeric")
            raw = self._engine.query(
                "SELECT data_paths, partition_key FROM system.tables "
                f"WHERE database = '{self.database}' AND name = '{table}'",
                "JSONEachRow").bytes()
            row = json.loads(raw) if raw.strip() else {"data_paths": [], "partition_key": ""}
            got = ([Path(x) for x in row["data_paths"]], str(row["partition_key"]))
            self._layouts[table] = got
        return got

    @staticmethod
    def _insert_parts(dirs: list[Path]) -> set[str]:
        """The names of the parts that inserts made (merge level 0), in ``dirs``."""
        out: set[str] = set()
        for d in dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                bits = name.split("_")
                if len(bits) == 4 and bits[3] == "0" and bits[1].isdigit() and \
                        bits[2].isdigit():
                    out.add(name)
        return out

    @staticmethod
    def _sync_parts(dirs: list[Path], parts: set[str]) -> None:
        """Make new parts' names durable: fsync each part's directory (its files' entries)
        and the table's (the part's rename from its temporary name). The engine has synced
        the files themselves (``fsync_after_insert``). A part already gone (merged and
        removed) is skipped; any other failure is the insert's (not acknowledged)."""
        for d in dirs:
            synced = False
            for name in parts:
                try:
                    fsync_dir(d / name)
                except FileNotFoundError:
                    continue
                synced = True
            if synced:
                fsync_dir(d)

    @staticmethod
    def _partitions(data: Any, key: str) -> int:
        """How many partitions the rows of ``data`` fall in, for the partition keys phiaudit
        uses (``toYYYYMM(c)``, ``toDate(c)`` of a UTC time column, or none); 1 for any other
        key or column (at least one part is then expected)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not key:
            return 1
        for fn, month in (("toYYYYMM(", True), ("toDate(", False)):
            if not (key.startswith(fn) and key.endswith(")")):
                continue
            name = key[len(fn):-1].strip("`")
            if name not in data.schema.names:
                return 1
            col = data.column(name)
            typ = col.type
            if not pa.types.is_timestamp(typ) or typ.tz not in (None, "UTC", "Etc/UTC"):
                return 1
            per_us = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}[typ.unit]
            # on the raw integers: two values (~0.2 ms) where converting the rows' times
            # costs ~2 ms for 4,096; a batch's rows nearly always share their month
            ints = pc.cast(col, pa.int64())
            bounds = pc.min_max(ints)
            lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
            if lo is None or _period(lo, per_us, month) == _period(hi, per_us, month):
                return 1
            return len({_period(v, per_us, month) for v in pc.unique(ints).to_pylist()})
        return 1

    def _stream_insert(self, table: str, data: Any, token: str,
                      types: list[str] | None = None) -> bool:
        """The embedded engine's insert, from memory (no copy of audit rows in /tmp): one
        block of the Native format where ``block_encoder`` takes the table (the engine's own
        format: ~5 ms less parsing per 4,096 audit rows), else one Arrow IPC stream (~1.6 us
        a row less than through a file)."""
        import pyarrow as pa

        if not table.replace("_", "").isalnum():
            raise ValueError("table name must be alphanumeric")
        payload: bytes | None = None
        if self.block_encoder is not None and types is not None:
            try:
                payload = self.block_encoder(data, types)
            except (ValueError, TypeError, OverflowError, RuntimeError, MemoryError,
                    pa.ArrowException) as exc:
                _log.warning("Native encoding of a block failed (%s); sending it as Arrow",
                             type(exc).__name__)
        fmt = "Native"
        if payload is None:
            fmt = "ArrowStream"
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, data.schema) as writer:
                writer.write_table(data)
            payload = sink.getvalue().to_pybytes()
        quoted = token.replace("\\", "\\\\").replace("'", "\\'")
        # Skip indexes are built when parts merge, not on the insert an acknowledgement waits
        # for (~3.5 ms of a 4,096-row insert here); a part not merged yet is read whole by a
        # query that would have skipped some of it (partition pruning still applies).
        settings = (f"insert_deduplication_token = '{quoted}', async_insert = 0, "
                    "materialize_skip_indexes_on_insert = 0")
        if fmt == "Native":
            # a Native block names its columns and the engine matches them by name: no column
            # list to analyse (~1.2 ms a statement for audit_events' 38 columns), and a name
            # the table does not have is an error rather than ignored
            sql = (f"INSERT INTO `{self.database}`.`{table}` SETTINGS {settings}, "
                   "input_format_skip_unknown_fields = 0")
        else:
            # the schema's own names (otel_traces has dotted ones: `Events.Name`), quoted
            columns = ", ".join("`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
                                for name in data.schema.names)
            sql = f"INSERT INTO `{self.database}`.`{table}` ({columns}) SETTINGS {settings}"
        try:
            with self._insert_lock:
                dirs, key = self._table_layout(table)
                before = self._insert_parts(dirs)
                inserter = self._engine.send_insert(sql, fmt)
                try:
                    inserter.append(payload)
                    inserter.finish()
                except BaseException:
                    with contextlib.suppress(Exception):
                        inserter.cancel()
                    raise
                # chDB's streaming insert returns without an error when writing its part
                # fails (~0.1 ms: two directory listings of the table's active parts)
                new_parts = self._insert_parts(dirs) - before
                self._sync_parts(dirs, new_parts)
                made = len(new_parts)
        except Exception as exc:
            raise _map_error(exc, f"insert into {table}") from exc
        return not data.num_rows or made >= self._partitions(data, key)

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None, *,
        settings: dict[str, Any] | None = None, binary: bool = False,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        fmt = {"String": "bytes", "FixedString": "bytes"} if binary else None
        try:
            with self._lock:
                result = self._client.query(
                    sql, parameters=parameters, settings=settings, query_formats=fmt,
                )
        except Exception as exc:
            raise _map_error(exc, "query") from exc
        return list(result.column_names), list(result.result_rows)

    def query_raw(self, sql: str, parameters: dict[str, Any] | None = None,
                  fmt: str = "RowBinary") -> bytes:
        """The result of a SELECT as the engine writes it in ``fmt``: no value becomes a
        Python object (a reader that takes whole blocks of fixed-width rows)."""
        try:
            with self._lock:
                data: bytes = self._client.raw_query(sql, parameters=parameters, fmt=fmt)
        except Exception as exc:
            raise _map_error(exc, "query") from exc
        return data

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        try:
            with self._lock:
                return self._client.command(sql, parameters=parameters)
        except Exception as exc:
            raise _map_error(exc, "statement") from exc

    def schema_version(self) -> int:
        """The schema version the store holds; 0 when the schema was never created."""
        try:
            _, rows = self.query("SELECT max(version) FROM schema_migrations")
        except PermanentError:
            return 0
        return int(rows[0][0] or 0)

    def chain_head(self, table: str, writer_id: str) -> tuple[int, bytes]:
        """The last committed (seq, hash) of ``writer_id`` in ``table``; (0, zeros) if none."""
        _, rows = self.query(
            f"SELECT seq, hash FROM {table} WHERE writer_id = {{w:String}} "
            "ORDER BY seq DESC LIMIT 1",
            {"w": writer_id}, binary=True,
        )
        if not rows:
            return 0, b"\x00" * 32
        seq, head = rows[0]
        return int(seq), bytes(head)

    def chain_rows(self, table: str, writer_id: str, first: int, last: int) -> int:
        """How many of ``writer_id``'s rows ``first``..``last`` are in ``table`` (a
        primary-key range: one query)."""
        _, rows = self.query(
            f"SELECT count() FROM {table} WHERE writer_id = {{w:String}} "
            "AND seq BETWEEN {a:UInt64} AND {b:UInt64}",
            {"w": writer_id, "a": first, "b": last})
        return int(rows[0][0])

    def release_memory(self) -> bool:
        """Give the memory the embedded engine's allocator holds freed back to the system
        (jemalloc keeps freed pages up to 5 s, ~100-290 MiB at full speed; measured in
        bench/README.md, session 10). True when done; a server's memory is its own (False)."""
        if not self.location.embedded or self._engine is None:
            return False
        try:
            # through the inserts' handle: a rule or staff query can hold the query lock for
            # seconds, the very time its freed pages pile up (measured: 124 MiB of them while
            # a rule run kept the guard waiting; bench/README.md, session 11)
            with self._insert_lock:
                self._engine.query("SYSTEM JEMALLOC PURGE")
        except Exception as exc:
            raise _map_error(exc, "release memory") from exc
        return True

    @property
    def engine_code(self) -> tuple[str, ...]:
        """The directories of the embedded engine's library files (chDB), whose code the
        service may page out (receiver/_memory.py); none for a server."""
        if not self.location.embedded or self._engine is None:
            return ()
        import chdb

        return (os.path.dirname(os.path.realpath(chdb.__file__)),)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._engine is not None:
                self._engine.close()
            self._client.close()
        except Exception:
            _log.debug("closing the store failed", exc_info=True)


def data_dir_from_env(value: str | None) -> Path:
    return Path(value or os.environ.get("PHIAUDIT_DATA_DIR") or "phiaudit-data")
