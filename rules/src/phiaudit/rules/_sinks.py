"""Alert delivery: sinks, and ``deliver_pending`` with retries recorded in ``alert_deliveries``.

Sinks come from the ``sinks`` list of the service's ``rules:`` section::

    sinks:
      - type: webhook                 # Alertmanager v2 (POST /api/v2/alerts) or any receiver
        url: https://alertmanager.internal:9093/api/v2/alerts
        headers: {Authorization: "Bearer ..."}    # printed as [REDACTED]
        ca_file: /etc/phiaudit/am-ca.pem          # https: the CA to trust (default: system)
        timeout_s: 10
        generator_url: https://grafana.internal/d/phiaudit   # optional
        resolve_after_s: 3600                      # endsAt = raised + this
      - type: otlp                    # OTLP/gRPC log records (a Collector, a SIEM)
        endpoint: collector.internal:4317
        insecure: false               # plaintext only when true (loopback tests)
        ca_file: /etc/phiaudit/collector-ca.pem
        headers: {x-api-key: "..."}
        timeout_s: 10
      - type: stdout                  # one JSON line per alert on the service's stdout

Every sink may have a ``name`` (default: its type, then ``type-2``, ...): the name deliveries
are recorded under, so renaming a sink re-sends what it had not acknowledged.

What leaves phiaudit is the alert as stored: rule, severity, window, the group-by values (ids
and blind indexes, never PHI in clear), the summary (free of PHI by construction), counts, and
trace ids. The evidence event ids are sent too (they identify rows, not people).

``deliver_pending`` keeps no state of its own: the ``alerts`` table says what was raised and
``alert_deliveries`` what was tried, when, and how it went. For each sink, an alert with no
``delivered`` row is sent when it has had fewer than ``max_attempts`` attempts and the
backoff since its last attempt (``base_backoff_s * 2**(attempts-1)``, at most
``max_backoff_s``) has passed. Every attempt is recorded, with the kind of failure (an HTTP
status, ``timeout``, ``connection``, ``tls``, a gRPC status name), never a message that could
quote data.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from phiaudit.storage import ConfigError

__all__ = [
    "AlertMessage",
    "DeliveryFailed",
    "OtlpSink",
    "Sink",
    "StdoutSink",
    "WebhookSink",
    "build_sinks",
    "deliver_pending",
]

_log = logging.getLogger("phiaudit.rules.sinks")

_LABEL = re.compile(r"[^A-Za-z0-9_]")
_SEVERITY_NUMBER = {"info": 9, "low": 9, "medium": 13, "warning": 13, "high": 17,
                    "critical": 21}


class DeliveryFailed(Exception):
    """A sink could not deliver; ``kind`` says how (never data)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class AlertMessage:
    """An alert as read back from ``alerts`` for delivery (no PHI in clear)."""

    alert_id: str
    time_us: int
    rule_id: str
    severity: str
    window_start_us: int
    window_end_us: int
    group: dict[str, Any]
    summary: str
    value: int
    evidence: list[str]
    evidence_count: int
    trace_ids: list[str]
    mode: str = "scheduled"

    @property
    def trace_id(self) -> str:
        """The first valid trace id of the evidence, or ''."""
        for t in self.trace_ids:
            if re.fullmatch(r"[0-9a-f]{32}", t or "") and t != "0" * 32:
                return t
        return ""

    def description(self) -> str:
        return (f"Rule {self.rule_id} ({self.severity}) raised alert {self.alert_id} for the "
                f"window {_iso(self.window_start_us)} to {_iso(self.window_end_us)}: "
                f"value {self.value}, {self.evidence_count} evidence event(s).")

    def as_json(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id, "time": _iso(self.time_us), "rule_id": self.rule_id,
            "severity": self.severity, "window_start": _iso(self.window_start_us),
            "window_end": _iso(self.window_end_us), "group": self.group,
            "summary": self.summary, "value": self.value,
            "evidence_count": self.evidence_count, "evidence": self.evidence,
            "trace_ids": self.trace_ids, "mode": self.mode,
        }


def _iso(us: int) -> str:
    t = _dt.datetime.fromtimestamp(us / 1_000_000, _dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Sink(Protocol):
    name: str
    kind: str
    batch_size: int

    def send(self, alerts: list[AlertMessage]) -> None:
        """Deliver every alert of the list, or raise ``DeliveryFailed``."""


def _redacted(headers: Mapping[str, str]) -> dict[str, str]:
    return dict.fromkeys(headers, "[REDACTED]")


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass
class WebhookSink:
    """POST a JSON array of Alertmanager v2 alerts (``/api/v2/alerts``)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    ca_file: str = ""
    timeout_s: float = 10.0
    generator_url: str = ""
    resolve_after_s: int = 3600
    name: str = "webhook"
    batch_size: int = 50
    kind: str = "webhook"

    def __repr__(self) -> str:
        return (f"WebhookSink(name={self.name!r}, url={_safe_url(self.url)!r}, "
                f"headers={_redacted(self.headers)!r}, ca_file={self.ca_file!r}, "
                f"timeout_s={self.timeout_s!r})")

    def payload(self, alerts: list[AlertMessage]) -> list[dict[str, Any]]:
        out = []
        for a in alerts:
            labels = {"alertname": a.rule_id, "severity": a.severity, "rule_id": a.rule_id,
                      "alert_id": a.alert_id, "source": "phiaudit"}
            for key, value in a.group.items():
                name = _LABEL.sub("_", str(key))
                if not name or name[0].isdigit():
                    name = "g_" + name
                if name not in labels and isinstance(value, str | int | float | bool):
                    labels[name] = str(value)
            item: dict[str, Any] = {
                "labels": labels,
                "annotations": {
                    "summary": a.summary, "description": a.description(),
                    "window_start": _iso(a.window_start_us), "window_end": _iso(a.window_end_us),
                    "value": str(a.value), "evidence_count": str(a.evidence_count),
                    "trace_id": a.trace_id,
                },
                "startsAt": _iso(a.window_start_us),
                "endsAt": _iso(max(a.time_us, a.window_end_us) + self.resolve_after_s * 1_000_000),
            }
            if self.generator_url:
                item["generatorURL"] = self.generator_url
            out.append(item)
        return out

    def send(self, alerts: list[AlertMessage]) -> None:
        body = json.dumps(self.payload(alerts), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "phiaudit",
                   **self.headers}
        req = urllib.request.Request(self.url, data=body, headers=headers,  # noqa: S310
                                     method="POST")
        ctx = _ssl_context(self.ca_file) if self.url.startswith("https://") else None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s,  # noqa: S310
                                        context=ctx) as resp:
                resp.read(65536)
                status = int(resp.status)
        except urllib.error.HTTPError as exc:
            raise DeliveryFailed(f"http_{exc.code}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLError):
                raise DeliveryFailed("tls") from None
            if isinstance(reason, TimeoutError):
                raise DeliveryFailed("timeout") from None
            raise DeliveryFailed("connection") from None
        except ssl.SSLError:
            raise DeliveryFailed("tls") from None
        except TimeoutError:
            raise DeliveryFailed("timeout") from None
        except OSError:
            raise DeliveryFailed("connection") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"http_{status}")


def _safe_url(url: str) -> str:
    """The URL without credentials or query (which may hold a key)."""
    m = re.match(r"^([a-z]+://)(?:[^@/]*@)?([^/?#]*)([^?#]*)", url)
    return (m.group(1) + m.group(2) + m.group(3)) if m else "[REDACTED]"


@dataclass
class OtlpSink:
    """OTLP/gRPC log records, one per alert, carrying the evidence's TraceId."""

    endpoint: str
    insecure: bool = False
    ca_file: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    name: str = "otlp"
    batch_size: int = 100
    kind: str = "otlp"

    def __repr__(self) -> str:
        return (f"OtlpSink(name={self.name!r}, endpoint={self.endpoint!r}, "
                f"insecure={self.insecure!r}, headers={_redacted(self.headers)!r})")

    def request(self, alerts: list[AlertMessage]) -> Any:
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.logs.v1 import logs_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2

        def kv(key: str, value: str | int) -> common_pb2.KeyValue:
            if isinstance(value, int):
                return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
            return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))

        now_ns = time.time_ns()
        records = []
        for a in alerts:
            attrs = [
                kv("phi.alert.rule_id", a.rule_id), kv("phi.alert.severity", a.severity),
                kv("phi.alert.id", a.alert_id),
                kv("phi.alert.window_start", _iso(a.window_start_us)),
                kv("phi.alert.window_end", _iso(a.window_end_us)),
                kv("phi.alert.value", a.value),
                kv("phi.alert.evidence_count", a.evidence_count),
            ]
            rec = logs_pb2.LogRecord(
                time_unix_nano=a.time_us * 1000, observed_time_unix_nano=now_ns,
                severity_number=_SEVERITY_NUMBER.get(a.severity, 13),  # type: ignore[arg-type]
                severity_text=a.severity.upper(),
                body=common_pb2.AnyValue(string_value=a.summary), attributes=attrs,
                event_name="phi.alert")
            if a.trace_id:
                rec.trace_id = bytes.fromhex(a.trace_id)
            records.append(rec)
        resource = resource_pb2.Resource(attributes=[kv("service.name", "phiaudit")])
        return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
            resource=resource,
            scope_logs=[logs_pb2.ScopeLogs(
                scope=common_pb2.InstrumentationScope(name="phiaudit.rules"),
                log_records=records)])])

    def send(self, alerts: list[AlertMessage]) -> None:
        import grpc
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

        raw = self.request(alerts).SerializeToString()
        try:
            if self.insecure:
                channel = grpc.insecure_channel(self.endpoint)
            else:
                roots = Path(self.ca_file).read_bytes() if self.ca_file else None
                channel = grpc.secure_channel(
                    self.endpoint, grpc.ssl_channel_credentials(root_certificates=roots))
        except (OSError, ValueError):
            raise DeliveryFailed("configuration") from None
        try:
            call = channel.unary_unary(
                "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                request_serializer=None, response_deserializer=None)
            metadata = tuple((k.lower(), v) for k, v in self.headers.items())
            resp = call(raw, timeout=self.timeout_s, metadata=metadata or None)
            parsed = logs_service_pb2.ExportLogsServiceResponse.FromString(resp)
            if parsed.partial_success.rejected_log_records:
                raise DeliveryFailed("partially_rejected")
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            raise DeliveryFailed(f"grpc_{code.name.lower() if code else 'error'}") from None
        finally:
            channel.close()


@dataclass
class StdoutSink:
    """One JSON line per alert."""

    name: str = "stdout"
    stream: IO[str] | None = None
    batch_size: int = 1000
    kind: str = "stdout"

    def send(self, alerts: list[AlertMessage]) -> None:
        out = self.stream or sys.stdout
        try:
            for a in alerts:
                out.write(json.dumps({"phiaudit_alert": a.as_json()}, separators=(",", ":"))
                          + "\n")
            out.flush()
        except (OSError, ValueError):
            raise DeliveryFailed("write") from None


# -- configuration -------------------------------------------------------------------------

_KEYS = {
    "webhook": {"type", "name", "url", "headers", "ca_file", "timeout_s", "generator_url",
                "resolve_after_s", "batch_size"},
    "otlp": {"type", "name", "endpoint", "insecure", "ca_file", "headers", "timeout_s",
             "batch_size"},
    "stdout": {"type", "name"},
}


def build_sinks(entries: Any, *, path: str = "rules.sinks") -> list[Sink]:
    """Sinks from the ``sinks`` config list; ``ConfigError`` lists every error with its key
    path (never a header's value)."""
    errors: list[str] = []
    sinks: list[Sink] = []
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: must be a list of sinks")
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: must be a mapping with a type")
            continue
        kind = entry.get("type")
        if kind not in _KEYS:
            errors.append(f"{where}.type: webhook, otlp or stdout")
            continue
        for key in sorted(set(entry) - _KEYS[kind]):
            errors.append(f"{where}.{key}: unknown key for a {kind} sink")
        name = entry.get("name") or kind
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
            errors.append(f"{where}.name: letters, digits and _.:- (at most 64)")
            name = kind
        if "name" not in entry:
            n = 2
            while name in names:
                name, n = f"{kind}-{n}", n + 1
        elif name in names:
            errors.append(f"{where}.name: {name!r} is used twice")
        names.add(name)
        headers = entry.get("headers", {}) or {}
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            errors.append(f"{where}.headers: a mapping of header names to strings")
            headers = {}
        timeout = entry.get("timeout_s", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
                not 0 < timeout <= 300:
            errors.append(f"{where}.timeout_s: seconds, more than 0 and at most 300")
            timeout = 10
        batch = entry.get("batch_size", 50)
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1000:
            errors.append(f"{where}.batch_size: an integer from 1 to 1000")
            batch = 50
        ca_file = entry.get("ca_file", "") or ""
        if not isinstance(ca_file, str) or (ca_file and not Path(ca_file).is_file()):
            errors.append(f"{where}.ca_file: no such file")
            ca_file = ""
        if kind == "webhook":
            url = entry.get("url")
            if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
                errors.append(f"{where}.url: an http:// or https:// URL")
                continue
            resolve = entry.get("resolve_after_s", 3600)
            if isinstance(resolve, bool) or not isinstance(resolve, int) or resolve < 0:
                errors.append(f"{where}.resolve_after_s: seconds, an integer >= 0")
                resolve = 3600
            gen = entry.get("generator_url", "") or ""
            if not isinstance(gen, str):
                errors.append(f"{where}.generator_url: a URL")
                gen = ""
            sinks.append(WebhookSink(url=url, headers=headers, ca_file=ca_file,
                                     timeout_s=float(timeout), generator_url=gen,
                                     resolve_after_s=resolve, name=name, batch_size=batch))
        elif kind == "otlp":
            endpoint = entry.get("endpoint")
            if not isinstance(endpoint, str) or not re.fullmatch(r"[^\s/]+:\d{1,5}", endpoint):
                errors.append(f"{where}.endpoint: HOST:PORT")
                continue
            insecure = entry.get("insecure", False)
            if not isinstance(insecure, bool):
                errors.append(f"{where}.insecure: true or false")
                insecure = False
            sinks.append(OtlpSink(endpoint=endpoint, insecure=insecure, ca_file=ca_file,
                                  headers=headers, timeout_s=float(timeout), name=name,
                                  batch_size=min(batch, 1000)))
        else:
            sinks.append(StdoutSink(name=name))
    if errors:
        raise ConfigError(errors)
    return sinks


# -- delivery ------------------------------------------------------------------------------

_ALERTS_SQL = """
SELECT toString(alert_id), toUnixTimestamp64Micro(time), rule_id, severity,
       toUnixTimestamp64Micro(window_start), toUnixTimestamp64Micro(window_end), group_key,
       summary, value, arrayMap(x -> toString(x), evidence), evidence_count, trace_ids, mode
FROM alerts
WHERE time >= fromUnixTimestamp64Micro({since:Int64})
  AND alert_id NOT IN (SELECT alert_id FROM alert_deliveries
                       WHERE sink = {sink:String} AND outcome = 'delivered')
ORDER BY time, alert_id
LIMIT 1 BY alert_id
LIMIT {limit:UInt32}
"""

_ATTEMPTS_SQL = """
SELECT toString(alert_id), count(), toUnixTimestamp64Micro(max(time))
FROM alert_deliveries
WHERE sink = {sink:String} AND alert_id IN (SELECT alert_id FROM alerts
                                            WHERE time >= fromUnixTimestamp64Micro({since:Int64}))
GROUP BY alert_id
"""


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes | bytearray) else str(v)


def _message(row: tuple[Any, ...]) -> AlertMessage:
    try:
        group = json.loads(_text(row[6]) or "{}")
        if not isinstance(group, dict):
            group = {"group": group}
    except ValueError:
        group = {}
    return AlertMessage(
        alert_id=_text(row[0]), time_us=int(row[1]), rule_id=_text(row[2]),
        severity=_text(row[3]), window_start_us=int(row[4]), window_end_us=int(row[5]),
        group=group, summary=_text(row[7]), value=int(row[8]),
        evidence=[_text(e) for e in row[9]], evidence_count=int(row[10]),
        trace_ids=[_text(t) for t in row[11]], mode=_text(row[12]))


def pending_alerts(store: Any, sink: str, *, since_us: int = 0,
                   limit: int = 1000) -> list[tuple[AlertMessage, int, int]]:
    """(alert, attempts so far, last attempt time) for every alert not delivered to ``sink``."""
    params = {"sink": sink, "since": since_us, "limit": limit}
    _, rows = store.query(_ALERTS_SQL, params)
    if not rows:
        return []
    _, att = store.query(_ATTEMPTS_SQL, {"sink": sink, "since": since_us})
    attempts = {_text(r[0]): (int(r[1]), int(r[2])) for r in att}
    out = []
    for row in rows:
        msg = _message(row)
        n, last = attempts.get(msg.alert_id, (0, 0))
        out.append((msg, n, last))
    return out


def deliver_pending(
    store: Any,
    submit: Callable[[dict[str, list[list[Any]]]], None],
    sinks: Iterable[Sink],
    *,
    max_attempts: int = 10,
    base_backoff_s: float = 5.0,
    max_backoff_s: float = 900.0,
    max_age_s: float = 7 * 86400,
    limit: int = 1000,
    now_us: int | None = None,
) -> int:
    """Send every pending alert to every sink; record each attempt. Returns the number of
    (alert, sink) deliveries that succeeded in this call. A sink that fails does not stop the
    others; a store failure propagates (nothing was lost: the tables hold the state)."""
    import uuid

    now = time.time_ns() // 1000 if now_us is None else now_us
    since = now - int(max_age_s * 1_000_000) if max_age_s > 0 else 0
    delivered = 0
    for sink in sinks:
        due: list[tuple[AlertMessage, int]] = []
        for msg, attempts, last in pending_alerts(store, sink.name, since_us=since,
                                                  limit=limit):
            if attempts >= max_attempts:
                continue
            if attempts:
                wait = min(max_backoff_s, base_backoff_s * 2 ** (attempts - 1))
                if now < last + int(wait * 1_000_000):
                    continue
            due.append((msg, attempts))
        for start in range(0, len(due), max(1, sink.batch_size)):
            chunk = due[start:start + sink.batch_size]
            outcome, error = "delivered", ""
            try:
                sink.send([m for m, _ in chunk])
            except DeliveryFailed as exc:
                outcome, error = "failed", exc.kind[:64]
            except Exception as exc:  # a sink's bug must not stop delivery to the others
                outcome, error = "failed", type(exc).__name__
            at = time.time_ns() // 1000 if now_us is None else now_us
            rows = [[uuid.UUID(m.alert_id), sink.name, n + 1, outcome, at, error]
                    for m, n in chunk]
            submit({"alert_deliveries": rows})
            if outcome == "delivered":
                delivered += len(chunk)
            else:
                _log.warning("alert delivery to sink %s failed (%s): %d alert(s), will retry",
                             sink.name, error, len(chunk))
    return delivered
