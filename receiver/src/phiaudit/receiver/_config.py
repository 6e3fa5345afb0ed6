"""The service configuration: typed, with defaults that work out of the box, validated once.

A YAML file (``phiaudit serve --config FILE``) holds the same keys as ``ServiceConfig``;
command-line flags override it. ``validate()`` reports every error with its key path, and the
service refuses to start on any. Secrets print as ``[REDACTED]``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from phiaudit.storage import ConfigError

from ._infra import InfraConfig

__all__ = ["DEFAULT_SENSITIVE_ATTRIBUTES", "ServiceConfig", "load_config"]

#: Removed from otel_traces (besides every phi.* attribute): they often carry PHI in clear.
DEFAULT_SENSITIVE_ATTRIBUTES = (
    "url.query", "url.full", "http.url", "http.target", "db.query.text", "db.statement",
    "db.query.parameter.*", "enduser.id", "user.id", "client.address", "http.client_ip",
    "net.peer.ip",
)


@dataclass
class ServiceConfig:
    listen: str = "127.0.0.1:4317"
    data_dir: str = ""
    clickhouse_url: str = ""
    database: str = "phiaudit"
    writer_id: str = ""
    max_message_bytes: int = 16 * 1024 * 1024
    batch_max_rows: int = 10_000
    batch_max_wait_ms: int = 200
    max_queue_rows: int = 500_000
    max_rows_per_request: int = 50_000
    ack_timeout_ms: int = 5_000
    retry_after_ms: int = 1_000
    spool_max_bytes: int = 1 << 30
    disk_encryption: bool = True
    workers: int = -1
    worker_min_bytes: int = 64 * 1024
    #: threads that extract and encrypt requests in process (the compiled extractor releases
    #: the GIL): -1 is one more than the cores, so that a core whose thread waits for the GIL
    #: has another to run (measured: 3 beat 2 and 4 on 2 cores)
    extract_threads: int = -1
    #: above this resident memory (MiB) the service gives the memory its allocators hold
    #: freed back to the system (receiver/_memory.py); 0: never
    memory_release_mb: int = 768
    #: the memory (MiB) one query of the rule engine or of `phiaudit sql` may use in the
    #: embedded engine, which it shares with the ingestion; 0: no limit (a ClickHouse server's
    #: own profiles limit its queries). A rule query that needs more is split by its groups
    #: (rules/_engine.py); a staff query is refused
    query_memory_mb: int = 64
    #: audit spans through the compiled extractor (_native.c) where it is built; false: all
    #: in Python (the reference mapping; slower)
    native_extractor: bool = True
    sensitive_attributes: list[str] = field(
        default_factory=lambda: list(DEFAULT_SENSITIVE_ATTRIBUTES))
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    #: signed checkpoints: at most this long between checkpoints of a growing chain,
    checkpoint_interval_ms: int = 60_000
    #: or after this many new rows of this service's writer,
    checkpoint_events: int = 100_000
    #: and a heartbeat this often when a chain is idle
    checkpoint_heartbeat_ms: int = 3_600_000
    #: write-once checkpoint directory outside the data dir (default DATA_DIR.anchor/)
    anchor_dir: str = ""
    #: OTLP sender authentication: "auto" (required off loopback) or "required"
    otlp_auth: str = "auto"
    clickhouse_ca_file: str = ""
    #: infrastructure ingestion: PHI catalog, rollups and sampling (see _infra.py)
    infra: dict[str, Any] = field(default_factory=dict)
    #: the rule engine: schedule, lateness, rule files, thresholds, sinks (see phiaudit.rules)
    rules: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "clickhouse_url" and value and "@" in value:
                value = "[REDACTED]"
            shown.append(f"{f.name}={value!r}")
        return "ServiceConfig(" + ", ".join(shown) + ")"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def validate(self) -> None:
        wrong = [f.name for f in fields(self)
                 if f.type == "str" and not isinstance(getattr(self, f.name), str)]
        if wrong:  # report these, then check the rest with the defaults in their place
            found = [f"{k}: must be a string" for k in wrong]
            try:
                replace(self, **{k: getattr(ServiceConfig(), k) for k in wrong}).validate()
            except ConfigError as exc:
                found += exc.errors
            raise ConfigError(found)
        errors: list[str] = []
        host, port = "", -1
        if ":" not in self.listen:
            errors.append("listen: expected HOST:PORT")
        else:
            host = self.host
            try:
                port = self.port
                if not 0 <= port <= 65535:
                    raise ValueError
            except ValueError:
                errors.append("listen: the port must be a number from 0 to 65535")
        if host and not _is_loopback(host) and not self.tls:
            errors.append(f"listen: refusing to listen on non-loopback address {host} without "
                          "TLS (set tls_cert_file and tls_key_file)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            errors.append("tls_cert_file/tls_key_file: both or neither")
        for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file",
                    "clickhouse_ca_file"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                errors.append(f"{key}: no such file")
        if self.tls_client_ca_file and not self.tls:
            errors.append("tls_client_ca_file: mutual TLS needs tls_cert_file and tls_key_file")
        if self.otlp_auth not in ("auto", "required"):
            errors.append("otlp_auth: \"auto\" (required off loopback) or \"required\"")
        positive = ("max_message_bytes", "batch_max_rows", "max_queue_rows", "ack_timeout_ms",
                    "retry_after_ms")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                errors.append(f"{key}: must be a positive integer")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or \
                not -1 <= self.workers <= 64:
            errors.append("workers: -1 (one per core), 0 (in process) or 1 to 64")
        if not isinstance(self.extract_threads, int) or isinstance(self.extract_threads, bool) \
                or not (self.extract_threads == -1 or 1 <= self.extract_threads <= 64):
            errors.append("extract_threads: -1 (one more than the cores) or 1 to 64")
        if not isinstance(self.disk_encryption, bool):
            errors.append("disk_encryption: true or false")
        if not isinstance(self.native_extractor, bool):
            errors.append("native_extractor: true or false")
        if not isinstance(self.spool_max_bytes, int) or isinstance(self.spool_max_bytes, bool) \
                or self.spool_max_bytes < 0:
            errors.append("spool_max_bytes: an integer >= 0 (0: no local spool)")
        if not isinstance(self.worker_min_bytes, int) or self.worker_min_bytes < 0:
            errors.append("worker_min_bytes: must be an integer >= 0")
        if not isinstance(self.batch_max_wait_ms, int) or self.batch_max_wait_ms < 0:
            errors.append("batch_max_wait_ms: must be an integer >= 0")
        if not isinstance(self.max_rows_per_request, int) or self.max_rows_per_request < 1:
            errors.append("max_rows_per_request: must be an integer >= 1")
        if isinstance(self.max_message_bytes, int) and self.max_message_bytes > 1 << 30:
            errors.append("max_message_bytes: at most 1 GiB")
        for key, zero in (("memory_release_mb", "never"), ("query_memory_mb", "no limit")):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 20:
                errors.append(f"{key}: an integer from 0 ({zero}) to 1048576")
        for key in ("checkpoint_interval_ms", "checkpoint_events", "checkpoint_heartbeat_ms"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                errors.append(f"{key}: must be a positive integer")
        if self.anchor_dir and self.data_dir and (
                Path(self.data_dir).resolve() in (a := Path(self.anchor_dir).resolve()).parents
                or a == Path(self.data_dir).resolve()):
            errors.append("anchor_dir: must be outside the data directory")
        if not self.database.replace("_", "").isalnum():
            errors.append("database: letters, digits and _ only")
        if not isinstance(self.sensitive_attributes, list) or not all(
                isinstance(a, str) for a in self.sensitive_attributes):
            errors.append("sensitive_attributes: must be a list of attribute names")
        if self.clickhouse_url and not self.clickhouse_url.startswith(("https://", "http://")):
            errors.append("clickhouse_url: must be https://user:pass@host:port/database")
        try:
            InfraConfig.from_mapping(self.infra)
        except ConfigError as exc:
            errors += exc.errors
        errors += _rules_errors(self.rules)
        if errors:
            raise ConfigError(errors)


def _rules_errors(section: Any) -> list[str]:
    """The ``rules:`` section's errors: its keys, its sinks, its rule files and settings."""
    from phiaudit.rules import RulesConfig, build_sinks, load_rules

    if not isinstance(section, dict):
        return ["rules: must be a mapping"]
    try:
        rules = RulesConfig.from_mapping(section)
    except ConfigError as exc:
        return exc.errors
    errors: list[str] = []
    for check in (lambda: build_sinks(list(rules.sinks)), lambda: load_rules(rules)):
        try:
            check()
        except ConfigError as exc:
            errors += exc.errors
    return errors


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | None, overrides: dict[str, Any]) -> ServiceConfig:
    """Defaults, then the YAML file, then environment, then command-line overrides."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path} ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {path} is not valid YAML") from exc
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError("config: the file must hold a mapping of keys")
        values.update(doc)
    env_map = {"PHIAUDIT_DATA_DIR": "data_dir", "PHIAUDIT_CLICKHOUSE_URL": "clickhouse_url",
               "PHIAUDIT_CLICKHOUSE_CA_FILE": "clickhouse_ca_file"}
    for env, key in env_map.items():
        if os.environ.get(env) and key not in values:
            values[key] = os.environ[env]
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ServiceConfig)}
    unknown = sorted(set(values) - known)
    errors = [f"{k}: unknown key" for k in unknown]  # reported with every other error
    cfg = ServiceConfig(**{k: v for k, v in values.items() if k in known})
    if not cfg.data_dir:
        cfg.data_dir = "phiaudit-data"
    try:
        cfg.validate()
    except ConfigError as exc:
        errors += exc.errors
    if errors:
        raise ConfigError(errors)
    return cfg
