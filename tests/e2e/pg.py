"""A real PostgreSQL with pgAudit for the end-to-end tests, and the log forwarding a Collector does.

* ``pgaudit_cluster(tmp)``: a throw-away cluster made with ``initdb`` in a temporary directory
  owned by the ``postgres`` system user (PostgreSQL refuses to run as root; as another user
  the cluster runs as that user), ``shared_preload_libraries = 'pgaudit'``, ``pgaudit.log =
  'read, write'``, ``pgaudit.log_relation = on``, logging to a file with ``log_line_prefix =
  '%m [%p] %q%u@%d '``, listening on 127.0.0.1 on a free port. ``create_clinic`` then makes
  the sample application's database (``CREATE EXTENSION pgaudit``, the PHI tables and the
  synthetic data, loaded with pgAudit off for that session: a set-up step, not an access), an
  application role and an analyst role.
* ``require_pgaudit()``: PostgreSQL with pgAudit must be installed (``make test`` installs it
  with ``deploy/ci/ensure-postgres.sh``). When it is not, the test fails in CI (``CI=true``)
  with the reason, and is skipped with the reason elsewhere.
* ``forward_log_file(...)``: stands in for an OpenTelemetry Collector's ``filelog`` receiver
  (see ``otel-config.yaml`` for the real pipeline): each log entry of the file (a line,
  with its continuation lines) becomes one OTLP log record, exported with the real SDK
  (``LoggerProvider`` + ``OTLPLogExporter``) to the receiver: body = the entry, attributes
  ``log.file.name`` and ``phi.infra.kind``, timestamp = the entry's ``%m`` prefix.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENSURE = ROOT / "deploy" / "ci" / "ensure-postgres.sh"
APP_ROLE = "ehr_app"
ANALYST_ROLE = "analyst_direct"
DATABASE = "clinic"
PHI_TABLES = ("patients", "observations", "encounters", "notes")
#: where a log entry starts: the ``%m`` of ``log_line_prefix`` (the filelog receiver's
#: ``multiline.line_start_pattern``)
ENTRY_START = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)? \S+ \[\d+\] ")


def pg_bin_dir() -> Path | None:
    """The ``bin`` directory of the newest PostgreSQL that has pgAudit (Debian layout)."""
    base = Path("/usr/lib/postgresql")
    majors = sorted((int(p.name) for p in base.glob("*") if p.name.isdigit()), reverse=True)
    for major in majors:
        if (base / str(major) / "lib" / "pgaudit.so").is_file() and (
                base / str(major) / "bin" / "postgres").is_file():
            return base / str(major) / "bin"
    return None


def require_pgaudit() -> Path:
    """The PostgreSQL ``bin`` directory; fails (CI) or skips (elsewhere) when not installed."""
    res = subprocess.run(["bash", str(ENSURE), "--check"], capture_output=True, text=True,
                         check=False)
    bin_dir = pg_bin_dir()
    if res.returncode == 0 and bin_dir is not None and shutil.which("psql"):
        return bin_dir
    reason = ("PostgreSQL with pgAudit is not installed (make test installs it with "
              f"deploy/ci/ensure-postgres.sh): {res.stderr.strip()}")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PgCluster:
    bin_dir: Path
    base: Path
    port: int
    run_as: list[str]  # the command prefix that runs as the cluster's owner

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "log" / "postgresql.log"

    def url(self, user: str, database: str = DATABASE) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, user: str, sql: str, database: str = DATABASE,
             ) -> subprocess.CompletedProcess[str]:
        """``psql -c SQL`` over TCP as the database role ``user``; raises if it fails."""
        res = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", user, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
        if res.returncode != 0:
            raise RuntimeError(f"psql as {user} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.run_as, str(self.bin_dir / "pg_ctl"), "-D",
                               str(self.data_dir), *args], capture_output=True, text=True,
                              timeout=120, check=False)

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.pg_ctl("-m", "fast", "-w", "stop")


CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{base}'
shared_preload_libraries = 'pgaudit'
pgaudit.log = 'read, write'
pgaudit.log_relation = on
pgaudit.log_catalog = off
pgaudit.log_parameter = off
logging_collector = on
log_destination = 'stderr'
log_directory = '{base}/log'
log_filename = 'postgresql.log'
log_rotation_age = 0
log_rotation_size = 0
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
fsync = off
synchronous_commit = off
full_page_writes = off
"""


def start_cluster(bin_dir: Path) -> PgCluster:
    """initdb + start, as the ``postgres`` system user when we are root."""
    base = Path(tempfile.mkdtemp(prefix="phiaudit-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            raise RuntimeError(
                "no 'postgres' system user to run PostgreSQL as (root can't)") from None
        os.chown(base, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    cluster = PgCluster(bin_dir, base, free_port(), run_as)
    res = subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-U", "postgres",
         "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
        capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    with open(cluster.data_dir / "postgresql.conf", "a") as conf:
        conf.write(CONF.format(port=cluster.port, base=base))
    res = cluster.pg_ctl("-w", "-t", "60", "-l", str(base / "pg_ctl.log"), "start")
    if res.returncode != 0:
        detail = (base / "pg_ctl.log").read_text(errors="replace")[-2000:] if (
            base / "pg_ctl.log").exists() else res.stderr
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start ({res.returncode}): {detail}")
    return cluster


def create_clinic(cluster: PgCluster) -> None:
    """The sample application's database: pgAudit, the schema and the synthetic data, a role
    for the application (reads and writes the tables) and one for an analyst (reads
    ``patients``)."""
    from sample.app import seed_postgres  # type: ignore[import-not-found]

    cluster.psql("postgres", f"CREATE ROLE {APP_ROLE} LOGIN", database="postgres")
    cluster.psql("postgres", f"CREATE ROLE {ANALYST_ROLE} LOGIN", database="postgres")
    cluster.psql("postgres", f"CREATE DATABASE {DATABASE}", database="postgres")
    cluster.psql("postgres", "CREATE EXTENSION pgaudit")
    seed_postgres(cluster.url("postgres"), audit_off=True)
    cluster.psql("postgres",
                 f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {APP_ROLE}; "
                 f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}; "
                 f"GRANT SELECT ON patients TO {ANALYST_ROLE}")


def pgaudit_cluster() -> PgCluster:
    """A running cluster with the clinic database (stop it with ``destroy``)."""
    bin_dir = require_pgaudit()
    cluster = start_cluster(bin_dir)
    try:
        create_clinic(cluster)
    except BaseException:
        destroy(cluster)
        raise
    return cluster


def destroy(cluster: PgCluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.base, ignore_errors=True)


# -- the Collector's filelog receiver, in a function ---------------------------------------------
def log_entries(path: Path, offset: int = 0) -> list[str]:
    """The entries of a PostgreSQL log file from ``offset``: a line that starts with the
    ``log_line_prefix`` timestamp, with the lines that follow it until the next one."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", errors="replace")
    entries: list[str] = []
    for line in text.splitlines():
        if ENTRY_START.match(line) or not entries:
            entries.append(line)
        else:
            entries[-1] += "\n" + line
    return entries


def _entry_time_ns(entry: str) -> int | None:
    m = re.match(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?) UTC ", entry)
    if not m:
        return None
    when = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1_000_000) * 1000


def forward_log_file(path: Path, endpoint: str, *, offset: int = 0, kind: str = "pgaudit",
                     only: str | None = None) -> int:
    """Send each log entry of ``path`` (from byte ``offset``) to the OTLP receiver at
    ``endpoint`` as a log record, as the Collector's filelog receiver with a multiline
    ``line_start_pattern`` and a timestamp parser would; ``only``: keep entries containing
    that text (the Collector's filter processor). Returns how many were sent."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    entries = [e for e in log_entries(path, offset) if only is None or only in e]
    provider = LoggerProvider(resource=Resource.create({"service.name": "postgresql",
                                                        "host.name": "db-host-1"}))
    provider.add_log_record_processor(BatchLogRecordProcessor(
        OTLPLogExporter(endpoint=endpoint, insecure=True, timeout=30)))
    logger = provider.get_logger("filelog")
    for entry in entries:
        logger.emit(timestamp=_entry_time_ns(entry), observed_timestamp=time.time_ns(),
                    body=entry, attributes={"log.file.name": path.name,
                                            "phi.infra.kind": kind})
    ok = provider.force_flush(60_000)
    provider.shutdown()
    if not ok:
        raise RuntimeError("the log records were not all exported")
    return len(entries)
