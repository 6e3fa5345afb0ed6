"""Alert delivery against real receivers: an HTTP server taking the Alertmanager v2 webhook,
a gRPC server implementing the OTLP LogsService, and stdout; retries with backoff, every
attempt recorded in alert_deliveries (a real chDB store), delivered exactly once."""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from phiaudit.rules import (
    OtlpSink,
    Sink,
    StdoutSink,
    WebhookSink,
    build_sinks,
    deliver_pending,
)
from phiaudit.storage import (
    ALERT_COLUMNS,
    DELIVERY_COLUMNS,
    Alert,
    BatchWriter,
    ConfigError,
    KeyRing,
    RecordEncoder,
    Store,
    StoreLocation,
    TableSpec,
    migrate,
)

NOW = 1_780_000_000_000_000  # a fixed "now" (UTC microseconds)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def iso(us: int) -> str:
    import datetime as dt

    t = dt.datetime.fromtimestamp(us / 10**6, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass
class Env:
    store: Any
    writer: BatchWriter
    encoder: RecordEncoder
    now: int = NOW

    def submit(self, tables: dict[str, list[list[Any]]]) -> None:
        self.writer.submit(None, tables).result(60)

    def alert(self, rule: str = "failed-auth-user", **kw: Any) -> Alert:
        a = Alert(uuid.uuid4(), kw.pop("time_us", self.now - 60_000_000), rule, "high",
                  self.now - 360_000_000, self.now - 60_000_000,
                  json.dumps({"actor_id": "dr-mallory", "client_bidx": "ab12"}),
                  "7 failed logins for dr-mallory in 5 minutes", 7,
                  [uuid.uuid4() for _ in range(3)], 7, kw.pop("trace_ids", [TRACE]))
        self.submit({"alerts": [self.encoder.alert_row(a)]})
        return a

    def deliveries(self, sink: str) -> list[tuple[Any, ...]]:
        _, rows = self.store.query(
            "SELECT toString(alert_id), attempt, outcome, error FROM alert_deliveries "
            "WHERE sink = {s:String} ORDER BY time, attempt", {"s": sink})
        return list(rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("store")
    ring = KeyRing.open(d)
    loc = StoreLocation(data_dir=d, url=None, database="phiaudit", ca_file=None,
                        disk_encryption=False)
    migrate(loc)
    store = Store.open(loc)
    writer = BatchWriter(store, "rules-test", [
        TableSpec("alerts", ALERT_COLUMNS, chained=True, dedup_column="alert_id"),
        TableSpec("alert_deliveries", DELIVERY_COLUMNS, chained=False)])
    writer.start()
    yield Env(store, writer, RecordEncoder.for_ring(ring))
    writer.shutdown()
    store.close()


@pytest.fixture(autouse=True)
def _fresh(env: Env) -> None:
        # (the tables are append-only): each test lives 30 days after the previous one, beyond
    # deliver_pending's max_age_s (7 days), so earlier tests' alerts are not pending for it
    env.now += 30 * 86400 * 10**6


@dataclass
class Receiver:
    """A real HTTP server on loopback; answers ``fail`` times with 503, then 200."""

    fail: int = 0
    bodies: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/alerts"

    def start(self) -> Receiver:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/api/v2/alerts":
                    self.send_response(404)
                elif rec.fail > 0:
                    rec.fail -= 1
                    self.send_response(503)
                else:
                    rec.bodies.append(json.loads(body))
                    rec.headers.append(dict(self.headers))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_webhook_alertmanager_format(env: Env, receiver: Receiver) -> None:
    a = env.alert()
    sink = WebhookSink(url=receiver.url, headers={"Authorization": "Bearer s3cret-token"},
                       generator_url="https://grafana.example/d/phiaudit", name="am")
    assert deliver_pending(env.store, env.submit, [sink], now_us=env.now) == 1
    assert len(receiver.bodies) == 1
    (item,) = receiver.bodies[0]
    assert item["labels"] == {"alertname": "failed-auth-user", "severity": "high",
                              "rule_id": "failed-auth-user", "alert_id": str(a.alert_id),
                              "source": "phiaudit", "actor_id": "dr-mallory",
                              "client_bidx": "ab12"}
    assert item["annotations"]["summary"] == "7 failed logins for dr-mallory in 5 minutes"
    assert str(a.alert_id) in item["annotations"]["description"]
    assert item["annotations"]["trace_id"] == TRACE
    assert item["startsAt"] == iso(env.now - 360_000_000)
    assert item["endsAt"] > item["startsAt"]
    assert item["generatorURL"] == "https://grafana.example/d/phiaudit"
    assert receiver.headers[0]["Authorization"] == "Bearer s3cret-token"
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert env.deliveries("am") == [(str(a.alert_id), 1, "delivered", "")]
    # delivered once: nothing more to send
    assert deliver_pending(env.store, env.submit, [sink], now_us=env.now + 10**9) == 0
    assert len(receiver.bodies) == 1
    # the secret is not printed
    assert "s3cret" not in repr(sink) and "[REDACTED]" in repr(sink)


def test_webhook_retried_with_backoff_then_delivered_once(env: Env, receiver: Receiver) -> None:
    a = env.alert()
    receiver.fail = 2
    sink = WebhookSink(url=receiver.url, name="flaky")
    t = env.now
    assert deliver_pending(env.store, env.submit, [sink], now_us=t, base_backoff_s=5) == 0
    # within the backoff: not tried again
    assert deliver_pending(env.store, env.submit, [sink], now_us=t + 4_000_000,
                           base_backoff_s=5) == 0
    assert env.deliveries("flaky") == [(str(a.alert_id), 1, "failed", "http_503")]
    assert deliver_pending(env.store, env.submit, [sink], now_us=t + 5_000_000,
                           base_backoff_s=5) == 0
    # second backoff is 10 s after the second attempt
    assert deliver_pending(env.store, env.submit, [sink], now_us=t + 14_000_000,
                           base_backoff_s=5) == 0
    assert deliver_pending(env.store, env.submit, [sink], now_us=t + 15_000_000,
                           base_backoff_s=5) == 1
    assert deliver_pending(env.store, env.submit, [sink], now_us=t + 99_000_000,
                           base_backoff_s=5) == 0
    assert env.deliveries("flaky") == [(str(a.alert_id), 1, "failed", "http_503"),
                                       (str(a.alert_id), 2, "failed", "http_503"),
                                       (str(a.alert_id), 3, "delivered", "")]
    assert len(receiver.bodies) == 1


def test_gives_up_after_max_attempts_and_unreachable_is_connection(env: Env) -> None:
    a = env.alert()
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    sink = WebhookSink(url=f"http://127.0.0.1:{port}/api/v2/alerts", name="down",
                       timeout_s=2)
    for i in range(5):
        deliver_pending(env.store, env.submit, [sink], now_us=env.now + i * 10**9,
                        max_attempts=3, base_backoff_s=1)
    assert env.deliveries("down") == [(str(a.alert_id), n, "failed", "connection")
                                      for n in (1, 2, 3)]


def test_stateless_across_restarts_and_sinks_independent(env: Env, receiver: Receiver) -> None:
    """A new process (new sink objects) picks up exactly what the tables say is pending; one
    failing sink does not hold back the others."""
    a1, a2 = env.alert(), env.alert("break-glass")
    out = io.StringIO()
    good: list[Sink] = [WebhookSink(url=receiver.url, name="am"),
                        StdoutSink(name="log", stream=out)]
    receiver.fail = 1
    assert deliver_pending(env.store, env.submit, good, now_us=env.now) == 2  # stdout only
    lines = [json.loads(x)["phiaudit_alert"] for x in out.getvalue().splitlines()]
    assert sorted(x["alert_id"] for x in lines) == sorted([str(a1.alert_id), str(a2.alert_id)])
    assert lines[0]["summary"] and lines[0]["trace_ids"] == [TRACE]
    # "restart": fresh sinks, same tables
    out2 = io.StringIO()
    again: list[Sink] = [WebhookSink(url=receiver.url, name="am"),
                         StdoutSink(name="log", stream=out2)]
    assert deliver_pending(env.store, env.submit, again, now_us=env.now + 60 * 10**6) == 2
    assert out2.getvalue() == ""
    assert sorted(x["labels"]["alert_id"] for x in receiver.bodies[0]) == sorted(
        [str(a1.alert_id), str(a2.alert_id)])


class _Logs:
    def __init__(self) -> None:
        self.requests: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self.metadata: list[dict[str, str]] = []

    def export(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        self.requests.append(logs_service_pb2.ExportLogsServiceRequest.FromString(raw))
        self.metadata.append(dict(context.invocation_metadata()))
        return bytes(logs_service_pb2.ExportLogsServiceResponse().SerializeToString())


def test_otlp_log_records_carry_the_trace_id(env: Env) -> None:
    with_trace = env.alert()
    without = env.alert("bulk-access", trace_ids=[])
    logs = _Logs()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.logs.v1.LogsService",
        {"Export": grpc.unary_unary_rpc_method_handler(logs.export)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        sink = OtlpSink(endpoint=f"127.0.0.1:{port}", insecure=True,
                        headers={"X-Api-Key": "k3y"}, name="collector")
        assert deliver_pending(env.store, env.submit, [sink], now_us=env.now) == 2
    finally:
        server.stop(None)
    (req,) = logs.requests
    assert logs.metadata[0]["x-api-key"] == "k3y"
    rl = req.resource_logs[0]
    assert {a.key: a.value.string_value for a in rl.resource.attributes} == {
        "service.name": "phiaudit"}
    assert len(rl.scope_logs[0].log_records) == 2
    by_id = {}
    for r in rl.scope_logs[0].log_records:
        attrs = {a.key: a.value for a in r.attributes}
        by_id[attrs["phi.alert.id"].string_value] = (r, attrs)
    r, attrs = by_id[str(with_trace.alert_id)]
    assert r.trace_id.hex() == TRACE
    assert r.body.string_value == "7 failed logins for dr-mallory in 5 minutes"
    assert attrs["phi.alert.rule_id"].string_value == "failed-auth-user"
    assert attrs["phi.alert.severity"].string_value == "high"
    assert attrs["phi.alert.window_start"].string_value == iso(env.now - 360_000_000)
    assert attrs["phi.alert.value"].int_value == 7
    assert r.severity_number == 17 and r.time_unix_nano == with_trace.time_us * 1000
    r2, attrs2 = by_id[str(without.alert_id)]
    assert r2.trace_id == b"" and attrs2["phi.alert.rule_id"].string_value == "bulk-access"
    assert [row[2] for row in env.deliveries("collector")] == ["delivered", "delivered"]


def test_otlp_unreachable_is_recorded(env: Env) -> None:
    env.alert()
    sink = OtlpSink(endpoint="127.0.0.1:9", insecure=True, timeout_s=2, name="nowhere")
    assert deliver_pending(env.store, env.submit, [sink], now_us=env.now) == 0
    (row,) = env.deliveries("nowhere")
    assert row[2] == "failed" and row[3] == "grpc_unavailable"


def test_build_sinks(tmp_path: Path) -> None:
    sinks = build_sinks([
        {"type": "webhook", "url": "https://am.example:9093/api/v2/alerts",
         "headers": {"Authorization": "Bearer xyz"}, "timeout_s": 3},
        {"type": "webhook", "url": "http://127.0.0.1:1/x"},
        {"type": "otlp", "endpoint": "collector:4317", "insecure": True},
        {"type": "stdout"},
    ])
    assert [s.name for s in sinks] == ["webhook", "webhook-2", "otlp", "stdout"]
    assert "xyz" not in repr(sinks)
    with pytest.raises(ConfigError) as err:
        build_sinks([
            {"type": "pager"},
            {"type": "webhook", "url": "ftp://x", "headers": {"A": 1}, "colour": "red"},
            {"type": "otlp", "endpoint": "no-port", "ca_file": str(tmp_path / "missing.pem")},
            "stdout",
            {"type": "stdout", "name": "a"}, {"type": "stdout", "name": "a"},
        ])
    assert err.value.errors == [
        "rules.sinks[0].type: webhook, otlp or stdout",
        "rules.sinks[1].colour: unknown key for a webhook sink",
        "rules.sinks[1].headers: a mapping of header names to strings",
        "rules.sinks[1].url: an http:// or https:// URL",
        "rules.sinks[2].ca_file: no such file",
        "rules.sinks[2].endpoint: HOST:PORT",
        "rules.sinks[3]: must be a mapping with a type",
        "rules.sinks[5].name: 'a' is used twice",
    ]


def test_webhook_https_with_ca_file(env: Env, tmp_path: Path) -> None:
    import ssl

    from tests.receiver.tls_certs import TestCA

    ca = TestCA(tmp_path / "ca")
    stranger = TestCA(tmp_path / "other", name="stranger CA")
    pair = ca.issue("alertmanager", server=True, hosts=("127.0.0.1",))
    receiver = Receiver()
    receiver.start()
    assert receiver.server is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    receiver.server.socket = ctx.wrap_socket(receiver.server.socket, server_side=True)
    url = receiver.url.replace("http://", "https://")
    try:
        a = env.alert()
        untrusted = WebhookSink(url=url, ca_file=str(stranger.cert_file), name="tls-bad",
                                timeout_s=5)
        assert deliver_pending(env.store, env.submit, [untrusted], now_us=env.now) == 0
        assert env.deliveries("tls-bad") == [(str(a.alert_id), 1, "failed", "tls")]
        trusted = WebhookSink(url=url, ca_file=str(ca.cert_file), name="tls-good",
                              timeout_s=5)
        assert deliver_pending(env.store, env.submit, [trusted], now_us=env.now) == 1
        assert [x["labels"]["alert_id"] for x in receiver.bodies[0]] == [str(a.alert_id)]
    finally:
        receiver.stop()
